"""Static plans: one group shape for the whole run (N / P groups, data parallel across them)."""

from __future__ import annotations

import numpy as np

from planner.cost import CostModel
from planner.microsteps import check_lengths, split
from planner.packing import Bin, Instance, list_schedule, to_micro_step
from planner.planner import Planner
from planner.types import GroupShape, MicroStep, StepPlan


def static_plan(cost: CostModel, lengths: list[int] | np.ndarray, shape: GroupShape) -> StepPlan:
    """Plan a batch on ``world / shape.size`` identical groups (longest first to the earliest-finishing group)."""
    world = cost.cluster.world
    if world % shape.size:
        raise ValueError(f"static group of {shape.size} GPUs does not divide the world of {world}")
    planner = Planner(cost, shapes=[shape])
    arr = check_lengths(lengths, cost, [shape])
    full = planner.instance(arr)
    work = (full.tmat * full.sizes[None, :]).min(axis=1)

    def one(ids: np.ndarray) -> MicroStep | None:
        inst: Instance = planner.instance(arr[ids], [shape])
        bins = [Bin(0) for _ in range(world // shape.size)]
        if not list_schedule(inst, bins, list(range(len(ids)))):
            return None
        return to_micro_step(inst, bins, ids, cost, 0.0)

    micro = split(arr, cost, work, one, lambda ms: sum(m.time_s for m in ms))
    return StepPlan(tuple(int(x) for x in arr), tuple(micro), 0.0, f"static {shape}")
