"""SPContext: everything one SP group needs for one step, travelling with the batch.

Like Megatron's ``PackedSeqParams``, the context carries the process groups with the data, so there is no
module-level group state: a model forward takes ``(tokens, ctx)`` and every attention layer reads ``ctx``.
Build it with :meth:`sp.groups.GroupPool.context`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist

from sp.kernels import KERNELS
from sp.layout import GroupLayout, Segment
from sp.timing import SpanTimer


@dataclass(frozen=True)
class SPContext:
    layout: GroupLayout
    rank: int  # rank inside the SP group (0..u*r-1)
    ulysses_group: dist.ProcessGroup | None = None  # the u ranks of my Ulysses sub-group (None when u == 1)
    ring_group: dist.ProcessGroup | None = None  # the r ranks of my ring (None when r == 1)
    ring_global_ranks: tuple[int, ...] = ()  # global ranks of my ring, in ring order
    causal: bool = True
    softmax_scale: float | None = None
    kernel: str = "torch"  # block kernel: torch | cpu_fused | flash; or ring_flash (ring-flash-attn's zigzag ring)
    head_chunks: int = 2  # Ulysses overlap: all-to-all of head chunk i+1 runs under attention of chunk i
    device: str = "cpu"  # where the per-step index tensors live (copied there once, not once per layer)
    timer: SpanTimer | None = field(default=None, compare=False)  # attention and comm-wait spans (sp.timing)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.layout.size:
            raise ValueError(f"rank {self.rank} outside the group of {self.layout.size}")
        if self.layout.r > 1 and len(self.ring_global_ranks) != self.layout.r:
            raise ValueError(
                f"ring of degree {self.layout.r} needs {self.layout.r} ranks, got {self.ring_global_ranks}"
            )
        if self.kernel not in (*KERNELS, "ring_flash"):
            valid = ", ".join(repr(k) for k in (*KERNELS, "ring_flash"))
            raise ValueError(f"unknown kernel {self.kernel!r}; valid: {valid}")
        if self.head_chunks < 1:
            raise ValueError(f"head_chunks must be >= 1, got {self.head_chunks}")

    @property
    def u(self) -> int:
        return self.layout.u

    @property
    def r(self) -> int:
        return self.layout.r

    @property
    def ring_rank(self) -> int:
        return self.rank // self.layout.u

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.layout.u

    @cached_property
    def ring_segments(self) -> tuple[tuple[Segment, ...], ...]:
        """Segments of every ring rank's ring-local buffer (index = ring rank)."""
        return tuple(self.layout.ring_segments(i) for i in range(self.layout.r))

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """True in-sequence position of each local token (for RoPE), on ``device``, copied once per step."""
        return self.layout.position_ids(self.rank).to(self.device)

    @cached_property
    def gather_perm(self) -> torch.Tensor | None:
        """The Ulysses receive-buffer permutation (:attr:`GroupLayout.gather_perm`) on ``device``; None where it
        is the identity (a single sequence): no index copy then."""
        perm = self.layout.gather_perm
        if torch.equal(perm, torch.arange(len(perm))):
            return None
        return perm.to(self.device)

    @property
    def cu_seqlens_local(self) -> torch.Tensor:
        return self.layout.local_cu_seqlens

    def scale_for(self, head_dim: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else head_dim**-0.5
