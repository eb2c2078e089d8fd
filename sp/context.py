"""SPContext: everything one SP group needs for one step, travelling with the batch.

Like Megatron's ``PackedSeqParams``, the context carries the process groups with the data, so there is no
module-level group state: a model forward takes ``(tokens, ctx)`` and every attention layer reads ``ctx``.
Build it with :meth:`sp.groups.GroupPool.context`.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.distributed as dist

from sp.kernels import KERNELS
from sp.layout import GroupLayout, Segment
from sp.step_tables import StepTables
from sp.timing import SpanTimer
from sp.ulysses import CommBuffers


class SPContext:
    """One SP group's context for one micro-step. A plain class on purpose, like :class:`StepTables` it
    holds: FSDP2 casts a module's forward inputs with ``_apply_to_tensors``, which rebuilds every dataclass it
    meets (``dataclasses.replace``), so a dataclass context would be rebuilt, with every cache lost, at every
    FSDP unit. Treat it as immutable."""

    def __init__(
        self,
        layout: GroupLayout,
        rank: int,  # rank inside the SP group (0..u*r-1)
        ulysses_group: dist.ProcessGroup | None = None,  # the u ranks of my Ulysses sub-group (None when u == 1)
        ring_group: dist.ProcessGroup | None = None,  # the r ranks of my ring (None when r == 1)
        ring_global_ranks: tuple[int, ...] = (),  # global ranks of my ring, in ring order
        causal: bool = True,
        softmax_scale: float | None = None,
        kernel: str = "torch",  # a block kernel of sp.kernels.KERNELS, or ring_flash (ring-flash-attn's ring)
        head_chunks: int = 2,  # Ulysses overlap: all-to-all of head chunk i+1 runs under attention of chunk i
        device: str = "cpu",  # where the per-step index tensors live (uploaded once, not once per layer)
        timer: SpanTimer | None = None,  # attention and comm-wait spans (sp.timing)
        comm_buffers: CommBuffers | None = None,  # counts the Ulysses all-to-all buffers in flight (sp.ulysses)
    ) -> None:
        if not 0 <= rank < layout.size:
            raise ValueError(f"rank {rank} outside the group of {layout.size}")
        if layout.r > 1 and len(ring_global_ranks) != layout.r:
            raise ValueError(f"ring of degree {layout.r} needs {layout.r} ranks, got {ring_global_ranks}")
        if kernel not in (*KERNELS, "ring_flash"):
            valid = ", ".join(repr(k) for k in (*KERNELS, "ring_flash"))
            raise ValueError(f"unknown kernel {kernel!r}; valid: {valid}")
        if head_chunks < 1:
            raise ValueError(f"head_chunks must be >= 1, got {head_chunks}")
        self.layout, self.rank = layout, rank
        self.ulysses_group, self.ring_group, self.ring_global_ranks = (
            ulysses_group,
            ring_group,
            tuple(ring_global_ranks),
        )
        self.causal, self.softmax_scale, self.kernel, self.head_chunks = causal, softmax_scale, kernel, head_chunks
        self.device, self.timer, self.comm_buffers = str(device), timer, comm_buffers
        self.tables = StepTables(self)  # the micro-step's device tables: built on first use, uploaded once

    def __repr__(self) -> str:
        return (f"SPContext(u={self.u}, r={self.r}, rank={self.rank}, sequences={len(self.layout.seqlens)}, "
                f"kernel={self.kernel!r}, device={self.device!r})")  # fmt: skip

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

    @property
    def position_ids(self) -> torch.Tensor:
        """True in-sequence position of each local token (for RoPE), on ``device`` (:class:`StepTables`)."""
        return self.tables.position_ids

    @property
    def gather_perm(self) -> torch.Tensor | None:
        """The Ulysses receive-buffer permutation (:attr:`GroupLayout.gather_perm`) on ``device``; None where it
        is the identity (a single sequence): no index copy then."""
        return self.tables.gather_perm

    @property
    def cu_seqlens_local(self) -> torch.Tensor:
        return self.layout.local_cu_seqlens

    def scale_for(self, head_dim: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else head_dim**-0.5
