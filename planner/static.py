"""Static plans: one group shape for the whole run (as many groups as the topology places, data parallel across
them; a size that does not divide the world leaves the remaining GPUs idle)."""

from __future__ import annotations

import time

import numpy as np

from planner.cost import CostModel
from planner.microsteps import check_lengths, search_split
from planner.packing import Instance, identical_schedule, to_micro_step
from planner.planner import Planner
from planner.types import GroupShape, MicroStep, StepPlan


def static_plan(
    cost: CostModel, lengths: list[int] | np.ndarray, shape: GroupShape, parts: list[np.ndarray] | None = None
) -> StepPlan:
    """Plan a batch on the most identical groups of ``shape`` that fit (longest first to the earliest-finishing
    group).

    ``parts``: use this micro-step split (the planner's, so that the comparison is like for like) when every
    part fits the layout; otherwise the layout gets its own fewest-micro-steps split."""
    planner = Planner(cost, shapes=[shape])
    if shape.size not in planner.topology.sizes:
        raise ValueError(f"static group of {shape.size} GPUs cannot be placed on {planner.topology.describe()}")
    groups = planner.topology.max_groups(shape.size)
    arr = check_lengths(lengths, cost, [shape])

    def one(ids: np.ndarray) -> MicroStep | None:
        inst: Instance = planner.instance(arr[ids], [shape])
        bins = identical_schedule(inst, 0, groups, list(range(len(ids))))
        return to_micro_step(inst, bins, ids, cost, 0.0) if bins is not None else None

    given = [one(np.asarray(ids)) for ids in parts] if parts else []
    if parts and all(m is not None for m in given):
        micro = [m for m in given if m is not None]
    else:  # the layout's own split, searched the same way as the planner's
        inst = planner.instance(arr)
        cap = float(inst.capacity[0]) * groups
        finish = inst.tmat[:, 0] + inst.beta[0]
        micro = search_split(
            arr, inst.cheapest_work(), finish, cap, groups * shape.size, float(inst.beta[0]), one,
            lambda ms: sum(m.time_s for m in ms), lambda ids: 0.0, time.perf_counter() + 1.0,
        ).plans  # fmt: skip
    return StepPlan(tuple(int(x) for x in arr), tuple(micro), 0.0, f"static {shape}")
