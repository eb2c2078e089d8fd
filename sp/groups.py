"""GroupPool: the process groups a plan uses, created when a micro-step first needs them, cached, bounded.

``new_group`` is collective over the whole world (every rank calls it, in the same order) and each NCCL
communicator holds GPU memory, so the pool creates neither every range a planner could choose up front (a
24-GPU world with groups of every size has thousands) nor groups per step. Instead every rank calls
:meth:`GroupPool.prepare` with the micro-step's groups ``(ranks, u)`` from the broadcast plan, in plan order.
The pool then, identically on every rank:

- lists the rank lists the groups need: the SP group, its u Ulysses sub-groups (u consecutive ranks) and its
  u strided ring sub-groups (:func:`ring_subgroups`), a list shared by two roles kept once;
- marks them used and first makes room: while a rank would hold more than ``max_per_rank`` communicators, the
  least recently used group holding such a rank is destroyed (every rank tracks every group, so all ranks
  destroy the same ones);
- creates the missing ones, one comm split per kind (SP groups, Ulysses sub-groups, ring sub-groups: the lists of
  a kind are disjoint within a micro-step) with torch's ``split_group`` (``ncclCommSplit`` from the default
  communicator) where the backend supports it, else one ``new_group`` per list.

A rank therefore holds at most ``max_per_rank`` communicators besides the default group; the cost model counts
that many (``cluster.max_communicators`` x ``cluster.comm_gib_per_group``, :meth:`planner.cost.CostModel.comm_gib`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from sp.context import SPContext
from sp.layout import GroupLayout
from sp.timing import SpanTimer
from sp.ulysses import CommBuffers

MIN_PER_RANK = 3  # one micro-step needs up to three groups per rank: SP group, Ulysses and ring sub-groups


def ring_subgroups(ranks: tuple[int, ...], u: int) -> list[tuple[int, ...]]:
    """The u strided rings of a group of ``len(ranks)`` ranks laid out as (ring index, Ulysses index)."""
    return [tuple(ranks[j + t * u] for t in range(len(ranks) // u)) for j in range(u)]


def ulysses_subgroups(ranks: tuple[int, ...], u: int) -> list[tuple[int, ...]]:
    """The r groups of u consecutive ranks of a group laid out as (ring index, Ulysses index)."""
    return [ranks[i : i + u] for i in range(0, len(ranks), u)]


def needed_lists(groups: Iterable[tuple[tuple[int, ...], int]]) -> list[list[tuple[int, ...]]]:
    """The rank lists of groups ``(ranks, u)`` by kind (SP groups, Ulysses sub-groups, ring sub-groups), each
    list of two ranks or more, each kept once (its first kind)."""
    kinds: list[list[tuple[int, ...]]] = [[], [], []]
    seen: set[tuple[int, ...]] = set()
    for ranks, u in groups:
        ranks = tuple(ranks)
        if len(ranks) % u:
            raise ValueError(f"group {ranks} cannot run Ulysses degree {u}: {u} does not divide {len(ranks)} ranks")
        for kind, lists in enumerate(([ranks], ulysses_subgroups(ranks, u), ring_subgroups(ranks, u))):
            for r in lists:
                if len(r) > 1 and r not in seen:
                    seen.add(r)
                    kinds[kind].append(r)
    return kinds


class GroupPool:
    def __init__(self, world: int | None = None, rank: int | None = None, max_per_rank: int = 16) -> None:
        if max_per_rank < MIN_PER_RANK:
            raise ValueError(f"max_per_rank={max_per_rank}; valid: >= {MIN_PER_RANK} (one micro-step's SP group, "
                             "Ulysses and ring sub-groups)")  # fmt: skip
        self.world = dist.get_world_size() if world is None else world
        self.rank = dist.get_rank() if rank is None else rank
        self.max_per_rank = max_per_rank
        self._groups: OrderedDict[tuple[int, ...], Any] = OrderedDict()  # least recently used first
        self._held: Counter[int] = Counter()  # communicators per rank
        self.created = 0
        self.destroyed = 0

    def __len__(self) -> int:
        return len(self._groups)

    def held(self, rank: int | None = None) -> int:
        """Communicators ``rank`` (default: this one) belongs to, the default group aside."""
        return self._held[self.rank if rank is None else rank]

    def prepare(self, groups: Iterable[tuple[tuple[int, ...], int]]) -> int:
        """Make the groups ``(ranks, u)`` of one micro-step and their sub-groups ready; call on every rank with
        the same groups in the same order. Returns how many were created."""
        kinds = needed_lists(groups)
        bad = [r for lists in kinds for r in lists if min(r) < 0 or max(r) >= self.world]
        if bad:
            raise ValueError(f"groups {bad} name ranks outside the world of {self.world}")
        needed = [r for lists in kinds for r in lists]
        for r in needed:
            if r in self._groups:
                self._groups.move_to_end(r)
        # room first: a rank never holds more than max_per_rank communicators, not even while groups are made
        self._evict(set(needed), Counter(rank for r in needed if r not in self._groups for rank in r))
        made = 0
        for lists in kinds:
            missing = [r for r in lists if r not in self._groups]
            for r, g in zip(missing, _create(missing, self.rank)):
                self._groups[r] = g
                self._held.update(r)
            made += len(missing)
        self.created += made
        return made

    def _evict(self, keep: set[tuple[int, ...]], coming: Counter[int]) -> None:
        """Destroy least recently used groups (never one in ``keep``) while a rank would hold more than
        ``max_per_rank`` with the ``coming`` groups per rank."""
        while True:
            over = {r for r in set(self._held) | set(coming) if self._held[r] + coming[r] > self.max_per_rank}
            victim = next((k for k in self._groups if k not in keep and over.intersection(k)), None)
            if victim is None:
                return
            group = self._groups.pop(victim)
            self._held.subtract(victim)
            if self.rank in victim and group is not None:
                dist.destroy_process_group(group)
            self.destroyed += 1

    def group(self, ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        ranks = tuple(ranks)
        if len(ranks) == 1:
            return None
        if ranks not in self._groups:
            raise ValueError(f"ranks {ranks} have no process group: call GroupPool.prepare with the micro-step's "
                             f"groups (on every rank) first; prepared: {len(self._groups)} groups")  # fmt: skip
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
        comm_buffers: CommBuffers | None = None,
    ) -> SPContext:
        """The SPContext of this rank inside SP group ``ranks`` of shape ``u x r`` (prepared with
        :meth:`prepare` first, except a group of the whole world, prepared here).

        With ``check`` the group agrees on the layout first (one small all-reduce), so a rank holding a
        different ``cu_seqlens`` or shape makes every rank raise instead of hanging later.
        """
        ranks = tuple(ranks)
        if u * r != len(ranks):
            raise ValueError(f"group of {len(ranks)} ranks cannot run u={u} x r={r}; need u * r == {len(ranks)}")
        if ranks == tuple(range(self.world)):  # every rank is in it, so every rank is here: safe to prepare
            self.prepare([(ranks, u)])
        if self.rank not in ranks:
            raise ValueError(f"rank {self.rank} is not in group {ranks}")
        layout = GroupLayout.build(cu_seqlens, u, r)
        me = ranks.index(self.rank)
        i, j = divmod(me, u)
        ring = ring_subgroups(ranks, u)[j]
        ulysses = ulysses_subgroups(ranks, u)[i]
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
            comm_buffers=comm_buffers,
        )


def _create(lists: list[tuple[int, ...]], rank: int) -> list[Any]:
    """Process groups for disjoint rank ``lists`` (collective: every rank calls with the same lists): this
    rank's group for the list holding it, None for the others."""
    if not lists:
        return []
    if _can_split():
        mine: dict[tuple[int, ...], Any] = {}
        for batch in _disjoint_batches(lists):  # ncclCommSplit: one colour per rank and call
            g = dist.split_group(split_ranks=[list(r) for r in batch])
            mine.update({r: g for r in batch if rank in r})
        return [mine.get(r) for r in lists]
    out = []
    for r in lists:
        g = dist.new_group(list(r))
        out.append(g if rank in r else None)
    return out


def _disjoint_batches(lists: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """``lists`` in batches of disjoint lists (first fit, order kept): one comm split each."""
    batches: list[tuple[set[int], list[tuple[int, ...]]]] = []
    for r in lists:
        home = next((b for b in batches if not b[0].intersection(r)), None)
        if home is None:
            home = (set(), [])
            batches.append(home)
        home[0].update(r)
        home[1].append(r)
    return [b[1] for b in batches]


def _can_split() -> bool:
    """Whether torch's ``split_group`` works here: the default group bound to a device with a backend that
    splits (NCCL); gloo does not."""
    if not hasattr(dist, "split_group"):
        return False
    default = dist.distributed_c10d._get_default_group()
    if default.bound_device_id is None or not torch.cuda.is_available():
        return False
    backend = default._get_backend(torch.device("cuda", torch.cuda.current_device()))
    return bool(getattr(backend, "supports_splitting", False))


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
