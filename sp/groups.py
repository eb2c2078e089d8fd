"""GroupPool: every process group a plan may use, created once at start-up.

``new_group`` is collective (every rank must call it, in the same order), so groups cannot be made per
step. The pool creates, for a world of N ranks:

- every *aligned power-of-two range* ``[k * 2^m, (k + 1) * 2^m)`` with 2 <= 2^m <= N: N/2 + N/4 + ... + 1
  = N - 1 groups (N a power of two). These are the SP groups and the Ulysses sub-groups of hybrids;
- for every such range of size P >= 4 and every Ulysses degree u in {2, 4, ..., P/2}, the u strided ring
  sub-groups ``{base + j + t * u}``: (N / P) * (P - 2) per P, at most N * log2(N) in all.

So N = 8 makes 7 + 10 = 17 groups, N = 64 makes 63 + 258 = 321. Any multiset of power-of-two group sizes
that sums to <= N can be placed as aligned ranges (largest first), so the planner only chooses sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sp.context import SPContext
from sp.layout import GroupLayout
from sp.timing import SpanTimer


def aligned_ranges(world: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    size = 2
    while size <= world:
        out.extend(tuple(range(b, b + size)) for b in range(0, world - size + 1, size))
        size *= 2
    return out


def ring_subgroups(ranks: tuple[int, ...], u: int) -> list[tuple[int, ...]]:
    """The u strided rings of a group of ``len(ranks)`` ranks laid out as (ring index, Ulysses index)."""
    return [tuple(ranks[j + t * u] for t in range(len(ranks) // u)) for j in range(u)]


def pool_rank_lists(world: int) -> list[tuple[int, ...]]:
    """Every rank list the pool creates, in creation order (the same on every rank)."""
    lists = aligned_ranges(world)
    for ranks in list(lists):
        u = 2
        while u <= len(ranks) // 2:
            lists.extend(ring_subgroups(ranks, u))
            u *= 2
    return lists


class GroupPool:
    def __init__(self, world: int | None = None, rank: int | None = None) -> None:
        self.world = dist.get_world_size() if world is None else world
        self.rank = dist.get_rank() if rank is None else rank
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for ranks in pool_rank_lists(self.world):
            if ranks not in self._groups:
                self._groups[ranks] = dist.new_group(list(ranks))

    def __len__(self) -> int:
        return len(self._groups)

    def warm(self, device: torch.device | None = None) -> None:
        """One tiny all-reduce on every group this rank belongs to, in creation order (the same on every
        rank, so no two ranks wait on each other in opposite orders). NCCL creates communicators lazily at
        a group's first collective; warming at start-up keeps that out of the first training step."""
        dev = device or _device_of(None)
        for ranks, group in self._groups.items():
            if self.rank in ranks:
                dist.all_reduce(torch.ones(1, device=dev), group=group)

    def group(self, ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        ranks = tuple(ranks)
        if len(ranks) == 1:
            return None
        if ranks not in self._groups:
            raise ValueError(
                f"ranks {ranks} are not a pooled group; groups are aligned power-of-two ranges "
                f"(and their strided ring sub-groups) of a world of {self.world}"
            )
        return self._groups[ranks]

    def context(
        self,
        ranks: tuple[int, ...],
        u: int,
        r: int,
        cu_seqlens: torch.Tensor | list[int] | tuple[int, ...],
        *,
        causal: bool = True,
        softmax_scale: float | None = None,
        kernel: str = "torch",
        head_chunks: int = 2,
        device: str | torch.device = "cpu",
        check: bool = True,
        timer: SpanTimer | None = None,
    ) -> SPContext:
        """The SPContext of this rank inside SP group ``ranks`` of shape ``u x r``.

        With ``check`` the group agrees on the layout first (one small all-reduce), so a rank holding a
        different ``cu_seqlens`` or shape makes every rank raise instead of hanging later.
        """
        ranks = tuple(ranks)
        if u * r != len(ranks):
            raise ValueError(f"group of {len(ranks)} ranks cannot run u={u} x r={r}; need u * r == {len(ranks)}")
        if self.rank not in ranks:
            raise ValueError(f"rank {self.rank} is not in group {ranks}")
        layout = GroupLayout.build(cu_seqlens, u, r)
        me = ranks.index(self.rank)
        i, j = divmod(me, u)
        ring = ring_subgroups(ranks, u)[j]
        ulysses = ranks[i * u : (i + 1) * u]
        if check and len(ranks) > 1:
            _agree(layout, self.group(ranks))
        return SPContext(
            layout=layout,
            rank=me,
            ulysses_group=self.group(ulysses),
            ring_group=self.group(ring),
            ring_global_ranks=ring,
            causal=causal,
            softmax_scale=softmax_scale,
            kernel=kernel,
            head_chunks=head_chunks,
            device=str(device),
            timer=timer,
        )


def _device_of(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective's tensors must live: the current GPU under NCCL (it has no CPU path)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(layout: GroupLayout, group: dist.ProcessGroup | None) -> None:
    key = torch.tensor(
        [hash((layout.seqlens, layout.u, layout.r)) % (2**52)], dtype=torch.float64, device=_device_of(group)
    )
    lo, hi = key.clone(), key.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if lo.item() != hi.item():
        raise ValueError(
            f"ranks of one SP group disagree on the batch layout (this rank: {len(layout.seqlens)} sequences, "
            f"{layout.total_tokens} tokens, u={layout.u}, r={layout.r}); every rank must pass the same cu_seqlens"
        )
