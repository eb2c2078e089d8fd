"""Turn shape counts into concrete groups: list scheduling, local search, and rank placement.

A *bin* is one SP group: a shape index, its sequences, its work (seconds) and tokens. A group's time is
``overhead[k] + work`` when it runs anything (k its shape), 0 otherwise.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from planner.cost import CostModel
from planner.topology import Topology
from planner.types import Assignment, GroupShape, MemoryMode, MicroStep


@dataclass
class Bin:
    k: int
    seqs: list[int] = field(default_factory=list)
    work: float = 0.0
    tokens: int = 0


@dataclass(frozen=True)
class Instance:
    """One micro-step's data: lengths, per-shape times [S, K], shape sizes and token capacities [K]."""

    lengths: np.ndarray
    tmat: np.ndarray
    shapes: tuple[GroupShape, ...]
    sizes: np.ndarray
    capacity: np.ndarray
    beta: np.ndarray  # [K] fixed seconds of one group's micro-step per shape (CostModel.group_overhead_s)
    topology: Topology  # where groups may sit (nodes x GPUs per node)
    mode: MemoryMode | None = None  # the memory mode these times and capacities assume (None: the model's)

    @property
    def world(self) -> int:
        return self.topology.world

    def fits(self, counts: np.ndarray) -> bool:
        """Whether ``counts`` [K] groups of each shape can be placed at once."""
        return self.topology.fits(np.repeat(self.sizes, np.asarray(counts, dtype=np.int64)).tolist())

    def cheapest_work(self) -> np.ndarray:
        """[S] each sequence's GPU-seconds on its cheapest memory-feasible shape (balances micro-step splits)."""
        fits = self.lengths[:, None] <= self.capacity[None, :]
        return np.where(fits, self.tmat * self.sizes[None, :], np.inf).min(axis=1)

    def take(self, ids: np.ndarray) -> Instance:
        """The instance of a subset of the sequences (rows of ``tmat``; shapes unchanged)."""
        return replace(self, lengths=self.lengths[ids], tmat=self.tmat[ids])  # tmat [len(ids), K]

    def select(self, ks: np.ndarray) -> Instance:
        """The instance restricted to shapes ``ks`` (columns of ``tmat``; sequences unchanged)."""
        return replace(self, tmat=self.tmat[:, ks], shapes=tuple(self.shapes[k] for k in ks.tolist()),
                       sizes=self.sizes[ks], capacity=self.capacity[ks], beta=self.beta[ks])  # fmt: skip

    def time(self, b: Bin) -> float:
        return float(self.beta[b.k]) + b.work if b.seqs else 0.0


def makespan(inst: Instance, bins: list[Bin]) -> float:
    return max((inst.time(b) for b in bins), default=0.0)


def add(inst: Instance, b: Bin, s: int) -> None:
    b.seqs.append(s)
    b.work += float(inst.tmat[s, b.k])
    b.tokens += int(inst.lengths[s])


def remove(inst: Instance, b: Bin, s: int) -> None:
    b.seqs.remove(s)
    b.work -= float(inst.tmat[s, b.k])
    b.tokens -= int(inst.lengths[s])


def list_schedule(inst: Instance, bins: list[Bin], seqs: list[int]) -> bool:
    """Longest first, each sequence to the bin where it would finish earliest (memory permitting)."""
    if not bins:
        return not seqs
    kb = np.array([b.k for b in bins])
    work = np.array([b.work for b in bins])
    tokens = np.array([b.tokens for b in bins], dtype=np.int64)
    cap = inst.capacity[kb]
    for s in sorted(seqs, key=lambda s: -int(inst.lengths[s])):
        finish = np.where(tokens + inst.lengths[s] <= cap, inst.beta[kb] + work + inst.tmat[s, kb], np.inf)
        i = int(np.argmin(finish))
        if not np.isfinite(finish[i]):
            return False
        work[i] += inst.tmat[s, kb[i]]
        tokens[i] += int(inst.lengths[s])
        bins[i].seqs.append(s)
    for b, w, t in zip(bins, work, tokens):
        b.work, b.tokens = float(w), int(t)
    return True


def identical_schedule(inst: Instance, k: int, n_bins: int, seqs: list[int]) -> list[Bin] | None:
    """``n_bins`` groups of shape k, longest first to the least-loaded group with memory room (a heap:
    O(S log B)); None when a sequence fits nowhere."""
    bins = [Bin(k) for _ in range(n_bins)]
    heap = [(0.0, i) for i in range(n_bins)]
    cap = inst.capacity[k]
    order = np.asarray(seqs)[np.argsort(-inst.lengths[seqs], kind="stable")].tolist()
    for s in order:
        skipped = []
        while heap and bins[heap[0][1]].tokens + inst.lengths[s] > cap:
            skipped.append(heapq.heappop(heap))
        if not heap:
            return None
        _, i = heapq.heappop(heap)
        add(inst, bins[i], s)
        heapq.heappush(heap, (bins[i].work, i))
        for item in skipped:
            heapq.heappush(heap, item)
    return bins


def improve(inst: Instance, bins: list[Bin], max_rounds: int = 400, deadline: float = math.inf) -> None:
    """Local search on the slowest group: move one of its sequences elsewhere, or swap one with another
    group's, whenever that lowers the slower of the two groups below the current makespan. Vectorised over
    all candidate destinations; ends when no move or swap helps, or at ``deadline`` (perf_counter seconds)."""
    n_seq = len(inst.lengths)
    where = np.full(n_seq, -1)
    for i, b in enumerate(bins):
        where[b.seqs] = i
    kb = np.array([b.k for b in bins])
    work = np.array([b.work for b in bins])
    tokens = np.array([b.tokens for b in bins], dtype=np.int64)
    cap = inst.capacity[kb]
    lens, tm, eps = inst.lengths, inst.tmat, 1e-12
    beta = inst.beta[kb]  # [bins]
    for _ in range(max_rounds):
        if time.perf_counter() > deadline:
            break
        busy = np.bincount(where, minlength=len(bins)) > 0
        times = np.where(busy, beta + work, 0.0)
        g = int(np.argmax(times))
        top = times[g]
        mine = np.nonzero(where == g)[0]
        done = False
        for s in mine[np.argsort(-tm[mine, kb[g]])]:
            # move s from g to any other bin
            new = beta + work + tm[s, kb]
            ok = (tokens + lens[s] <= cap) & (new < top - eps)
            ok[g] = False
            if ok.any():
                h = int(np.argmin(np.where(ok, new, np.inf)))
                work[g] -= tm[s, kb[g]]
                work[h] += tm[s, kb[h]]
                tokens[g] -= lens[s]
                tokens[h] += lens[s]
                where[s] = h
                done = True
                break
            # swap s with a sequence s2 of another bin h
            others = np.nonzero(where != g)[0]
            if not len(others):
                continue
            h2 = where[others]
            dl = lens[others] - lens[s]
            new_g = beta[g] + work[g] - tm[s, kb[g]] + tm[others, kb[g]]
            new_h = beta[h2] + work[h2] - tm[others, kb[h2]] + tm[s, kb[h2]]
            worst = np.maximum(new_g, new_h)
            ok = (tokens[g] + dl <= cap[g]) & (tokens[h2] - dl <= cap[h2]) & (worst < top - eps)
            if ok.any():
                j = int(np.argmin(np.where(ok, worst, np.inf)))
                s2, h = int(others[j]), int(h2[j])
                work[g] += tm[s2, kb[g]] - tm[s, kb[g]]
                work[h] += tm[s, kb[h]] - tm[s2, kb[h]]
                tokens[g] += dl[j]
                tokens[h] -= dl[j]
                where[s], where[s2] = h, g
                done = True
                break
        if not done:
            break
    for i, b in enumerate(bins):
        b.seqs = np.nonzero(where == i)[0].tolist()
        b.work = float(tm[b.seqs, b.k].sum()) if b.seqs else 0.0
        b.tokens = int(lens[b.seqs].sum()) if b.seqs else 0


def to_micro_step(inst: Instance, bins: list[Bin], seq_ids: np.ndarray, cost: CostModel, bound: float) -> MicroStep:
    """Place the used bins on rank ranges (planner.topology: groups spanning nodes on whole nodes, the others
    packed into nodes) and map local sequence indices to batch indices."""
    used = sorted((b for b in bins if b.seqs), key=lambda b: -int(inst.sizes[b.k]))
    firsts = inst.topology.place([int(inst.sizes[b.k]) for b in used])
    if firsts is None:
        raise AssertionError(f"groups of sizes {[int(inst.sizes[b.k]) for b in used]} do not fit {inst.topology}")
    groups = [
        Assignment(
            first_rank=first,
            shape=inst.shapes[b.k],
            seqs=tuple(int(seq_ids[s]) for s in sorted(b.seqs)),
            time_s=inst.time(b),
            memory_gib=cost.memory_gib(b.tokens, int(inst.sizes[b.k]), inst.shapes[b.k]),
        )
        for b, first in zip(used, firsts)
    ]
    groups.sort(key=lambda g: g.first_rank)
    return MicroStep(tuple(groups), bound, inst.mode, cost.fsdp_time)
