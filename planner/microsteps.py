"""The micro-step split: how many micro-steps a step runs and which sequences go together (FlexSP's sequence
blaster, searched instead of fixed).

Memory sets a floor, m0 = ceil(tokens / what the cluster holds at once), but the floor is not always best: a
long sequence's micro-step may leave GPUs idle that one more micro-step would not. :func:`search_split` tries
m = m0, m0 + 1, ... and, for each m, four splits, each scored by fast greedy plans of its parts:

- ``contiguous``: sorted longest first, cut into m runs of about equal tokens (FlexSP's blaster);
- ``balanced``: longest first, each to the micro-step with the least work that has memory room;
- ``mixed``: longest first, each to the micro-step whose estimated time, max(longest finish, b0 + work / N),
  grows least: short sequences fill the shadow of a long one, long ones pair up only while that is free;
- ``timed``: sorted longest first, cut into runs of about equal estimated time (not equal tokens).

It keeps the best split seen and stops after ``patience`` values of m that did not improve it, at
``max_extra`` micro-steps over the floor, or at the deadline (once any split fits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from planner.cost import CostModel
from planner.types import GroupShape

T = TypeVar("T")


def check_lengths(lengths: list[int] | np.ndarray, cost: CostModel, shapes: list[GroupShape]) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.size == 0:
        raise ValueError("empty batch: need at least one sequence length")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths must be a flat list of integers, got dtype {arr.dtype} and shape {arr.shape}")
    bad = arr[arr <= 0]
    if bad.size:
        raise ValueError(f"sequence lengths must be >= 1, got {bad[:5].tolist()}")
    cap = max(cost.tokens_capacity(sh.size, sh) for sh in shapes)
    if arr.max() > cap:
        raise ValueError(
            f"sequence of length {int(arr.max())} exceeds what the cluster can hold in one SP group "
            f"({int(cap)} tokens on {cost.cluster.world} GPUs of {cost.cluster.memory_gib} GiB with "
            f"checkpointing={cost.model.checkpointing!r}); use more GPUs, full checkpointing or a shorter max_len"
        )
    return arr.astype(np.int64)


def contiguous_split(lengths: np.ndarray, m: int) -> list[np.ndarray]:
    """FlexSP's blaster: sorted longest first, cut into m runs of about equal tokens."""
    order = np.argsort(-lengths, kind="stable")
    cum = np.cumsum(lengths[order])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, m) / m, side="left") + 1
    return [p for p in np.split(order, np.unique(np.clip(cuts, 1, len(order) - 1))) if len(p)]


def timed_split(
    lengths: np.ndarray, m: int, work: np.ndarray, finish: np.ndarray, capacity: float, world: int, b0: float
) -> list[np.ndarray] | None:
    """Sorted longest first, cut into at most m runs of about equal *estimated time* max(first finish,
    b0 + work / N) instead of equal tokens: the smallest time tau at which runs that each fit in memory and
    in tau cover the batch (bisection on tau; each run is extended as far as prefix sums allow)."""
    order = np.argsort(-lengths, kind="stable")
    cum_tok = np.concatenate([[0.0], np.cumsum(lengths[order].astype(float))])  # [S + 1]
    cum_work = np.concatenate([[0.0], np.cumsum(work[order])])  # [S + 1]
    top = finish[order]  # [S] a run's first sequence is its longest

    def cuts(tau: float) -> list[int] | None:
        out, i = [0], 0
        while i < len(order):
            if top[i] > tau or len(out) > m:
                return None
            by_tokens = np.searchsorted(cum_tok, cum_tok[i] + capacity, side="right") - 1
            by_time = np.searchsorted(cum_work, cum_work[i] + (tau - b0) * world, side="right") - 1
            i = max(i + 1, int(min(by_tokens, by_time)))  # a run holds at least its first sequence
            out.append(i)
        return out if len(out) - 1 <= m else None

    lo, hi = float(top.max()), float(top.max()) + b0 + float(cum_work[-1]) / world
    if not np.isfinite(hi) or cuts(hi) is None:
        return None
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if cuts(mid) is not None else (mid, hi)
    bounds = cuts(hi)
    assert bounds is not None
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def balanced_split(lengths: np.ndarray, m: int, work: np.ndarray, capacity: float) -> list[np.ndarray] | None:
    """Longest first, each sequence to the micro-step with the least work that still has memory room."""
    return _greedy_split(lengths, m, capacity, work, None)


def mixed_split(
    lengths: np.ndarray, m: int, work: np.ndarray, finish: np.ndarray, capacity: float, world: int, b0: float
) -> list[np.ndarray] | None:
    """Longest first, each to the micro-step whose estimated time max(top finish, b0 + work / N) grows least
    (ties: least work)."""
    return _greedy_split(lengths, m, capacity, work, (finish, world, b0))


def _greedy_split(
    lengths: np.ndarray, m: int, capacity: float, work: np.ndarray, mixed: tuple[np.ndarray, int, float] | None
) -> list[np.ndarray] | None:
    """Longest first, each sequence to a micro-step with memory room: the least-loaded one, or (``mixed``)
    the one whose estimated time grows least. Plain Python: m is small and this runs per sequence."""
    load, top, tokens = [0.0] * m, [0.0] * m, [0] * m
    owner = np.empty(len(lengths), dtype=np.int64)
    lens, w = lengths.tolist(), work.tolist()
    fin = mixed[0].tolist() if mixed else []
    for s in np.argsort(-lengths, kind="stable").tolist():
        best, best_key = -1, (math.inf, math.inf)
        for j in range(m):
            if tokens[j] + lens[s] > capacity:
                continue
            if mixed:
                _, world, b0 = mixed
                before = max(top[j], b0 + load[j] / world)
                grow = max(top[j], fin[s], b0 + (load[j] + w[s]) / world) - before
                key = (grow, load[j])
            else:
                key = (load[j], 0.0)
            if key < best_key:
                best, best_key = j, key
        if best < 0:
            return None
        owner[s] = best
        load[best] += w[s]
        top[best] = max(top[best], fin[s]) if mixed else 0.0
        tokens[best] += lens[s]
    return [np.nonzero(owner == j)[0] for j in range(m) if (owner == j).any()]


@dataclass(frozen=True)
class SplitChoice(Generic[T]):
    parts: list[np.ndarray]
    plans: list[T]
    score: float
    kind: str
    tried: int  # splits scored


def search_split(
    lengths: np.ndarray,
    work: np.ndarray,
    finish: np.ndarray,
    capacity: float,
    world: int,
    b0: float,
    evaluate: Callable[[np.ndarray], T | None],
    score: Callable[[list[T]], float],
    estimate: Callable[[np.ndarray], float],
    deadline: float,
    max_extra: int = 8,
    patience: int = 2,
) -> SplitChoice[T]:
    """The best split found (see the module docstring). ``work`` [S]: cheapest GPU-seconds, ``finish`` [S]:
    fastest finish (seconds), ``capacity``: tokens per micro-step, ``evaluate``: a fast plan of one part or
    None when it cannot fit, ``estimate``: a lower bound on any plan of one part (a split whose bounds
    already reach the best score is skipped unplanned)."""
    m0 = max(1, math.ceil(lengths.sum() / capacity - 1e-9))
    best: SplitChoice[T] | None = None
    seen: set[tuple[int, ...]] = set()
    stale, tried, m = 0, 0, m0
    while m <= len(lengths):
        improved = False
        options = {
            "contiguous": contiguous_split(lengths, m),
            "balanced": balanced_split(lengths, m, work, capacity * 0.95) if m > 1 else None,
            "mixed": mixed_split(lengths, m, work, finish, capacity * 0.95, world, b0) if m > 1 else None,
            "timed": timed_split(lengths, m, work, finish, capacity * 0.95, world, b0) if m > 1 else None,
        }
        for kind, parts in options.items():
            if parts is None or any(lengths[p].sum() > capacity for p in parts):
                continue
            owner = np.empty(len(lengths), dtype=np.int64)
            for i, p in enumerate(sorted(parts, key=lambda p: int(p.min()))):
                owner[p] = i
            key = tuple(owner.tolist())
            if key in seen:
                continue
            seen.add(key)
            if best is not None and sum(estimate(ids) for ids in parts) >= best.score:
                continue
            plans: list[T] = []
            for ids in parts:
                plan = evaluate(ids)
                if plan is None:
                    break
                plans.append(plan)
            else:
                tried += 1
                s = score(plans)
                if best is None or s < best.score:
                    best, improved = SplitChoice(parts, plans, s, kind, tried), True
        if best is not None:
            stale = 0 if improved else stale + 1
            if stale >= patience or m - m0 >= max_extra or time.perf_counter() > deadline:
                break
        m += 1
    if best is None:
        raise ValueError(f"could not fit {len(lengths)} sequences into micro-steps on {world} GPUs")
    return SplitChoice(best.parts, best.plans, best.score, best.kind, tried)
