"""Split a batch into the fewest micro-steps that fit in memory (FlexSP's sequence blaster).

Start from the memory floor M = ceil(tokens / cluster capacity); spread the sequences over M micro-steps
(longest first, to the least-loaded one with memory room) and raise M until every part can be planned.
Step time = the sum of the micro-steps' makespans.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

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
    cap = max(cost.tokens_capacity(sh.size) for sh in shapes)
    if arr.max() > cap:
        raise ValueError(
            f"sequence of length {int(arr.max())} exceeds what the cluster can hold in one SP group "
            f"({int(cap)} tokens on {cost.cluster.world} GPUs of {cost.cluster.memory_gib} GiB with "
            f"checkpointing={cost.model.checkpointing!r}); use more GPUs, full checkpointing or a shorter max_len"
        )
    return arr.astype(np.int64)


def balanced_split(lengths: np.ndarray, m: int, work: np.ndarray, capacity: float) -> list[np.ndarray] | None:
    """Longest first, each sequence to the micro-step with the least work that still has memory room.

    FlexSP's blaster cuts the sorted list into contiguous runs, which puts every long sequence into the first
    micro-step and leaves it memory-bound; spreading them keeps each micro-step a mix of long and short.
    """
    load = np.zeros(m)
    tokens = np.zeros(m)
    owner = np.empty(len(lengths), dtype=np.int64)
    for s in np.argsort(-lengths, kind="stable"):
        room = tokens + lengths[s] <= capacity
        if not room.any():
            return None
        j = int(np.argmin(np.where(room, load, np.inf)))
        owner[s] = j
        load[j] += work[s]
        tokens[j] += lengths[s]
    return [np.nonzero(owner == j)[0] for j in range(m) if (owner == j).any()]


def contiguous_split(lengths: np.ndarray, m: int) -> list[np.ndarray]:
    """FlexSP's blaster: sorted longest first, cut into m runs of about equal tokens."""
    order = np.argsort(-lengths, kind="stable")
    cum = np.cumsum(lengths[order])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, m) / m, side="left") + 1
    return [p for p in np.split(order, np.unique(np.clip(cuts, 1, len(order) - 1))) if len(p)]


def split(
    lengths: np.ndarray,
    cost: CostModel,
    work: np.ndarray,
    plan_one: Callable[[np.ndarray], T | None],
    score: Callable[[list[T]], float],
    refine: Callable[[np.ndarray], T | None] | None = None,
) -> list[T]:
    """Fewest micro-steps (from the memory floor up) whose every part ``plan_one`` can plan; of the
    contiguous and the balanced split, the one whose plans ``score`` lowest. With ``refine``, the cheap
    ``plan_one`` only chooses the split and ``refine`` (the expensive planner) plans the chosen one.

    ``work`` [S] is each sequence's cheapest GPU-seconds; balanced parts fill to 95% of the cluster's tokens,
    leaving the packer room.
    """
    capacity = cost.tokens_capacity(1) * cost.cluster.world
    m = max(1, math.ceil(lengths.sum() / capacity))
    while m <= len(lengths):
        found: list[tuple[list[T], list[np.ndarray]]] = []
        options: list[list[np.ndarray] | None] = [contiguous_split(lengths, m)]
        if m > 1:  # one micro-step: both splits are the whole batch
            options.append(balanced_split(lengths, m, work, capacity * 0.95))
        for parts in options:
            if parts is None:
                continue
            plans = []
            for ids in parts:
                p = plan_one(ids)
                if p is None:
                    break
                plans.append(p)
            else:
                found.append((plans, parts))
        if found:
            plans, parts = min(found, key=lambda f: score(f[0]))
            if refine is None:
                return plans
            better = [refine(ids) for ids in parts]
            return [b if b is not None and score([b]) <= score([p]) else p for b, p in zip(better, plans)]
        m += 1
    raise ValueError(f"could not fit {len(lengths)} sequences into micro-steps on {cost.cluster.world} GPUs")
