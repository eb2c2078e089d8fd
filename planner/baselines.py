"""Baselines, through the same cost model and the same micro-step split as the planner.

- ``static_<family>``: one (u, r) layout for the whole run, as Megatron CP / DeepSpeed-Ulysses users set it:
  N / P identical groups (data parallel across them), the best layout of the family whose groups hold the
  longest sequence, on the planner's micro-step split (its own split where a part does not fit the layout);
  sequences go longest-first to the group that finishes first (a strong balancer, never a round-robin
  strawman). Families: ``ulysses`` (r = 1), ``ring`` (u = 1), ``hybrid`` (u, r > 1), and
  ``best_static`` over every layout.
- ``ulysses_hetero``: FlexSP's setting, heterogeneous group sizes but Ulysses only, planned by our planner.
- ``greedy``: fluid sizing plus longest-first list scheduling and local search, no MILP.
"""

from __future__ import annotations

import numpy as np

from planner.cost import CostModel
from planner.microsteps import check_lengths
from planner.planner import Planner, PlannerConfig
from planner.static import static_plan
from planner.types import GroupShape, StepPlan

FAMILIES = {
    "ulysses": lambda s: s.ring == 1,
    "ring": lambda s: s.ulysses == 1,
    "hybrid": lambda s: s.ulysses > 1 and s.ring > 1,
    "any": lambda s: True,
}


def static_step_s(
    planner: Planner, lengths: np.ndarray, shape: GroupShape, parts: list[np.ndarray] | None = None
) -> float | None:
    """Step time of one static layout, or None when its groups cannot hold the longest sequence."""
    cost = planner.cost
    if cost.cluster.world % shape.size or lengths.max() > cost.tokens_capacity(shape.size):
        return None
    try:
        return static_plan(cost, lengths, shape, parts).time_s
    except ValueError:
        return None


def best_static(
    planner: Planner, lengths: np.ndarray, family: str, parts: list[np.ndarray] | None = None
) -> tuple[float, GroupShape] | None:
    if family not in FAMILIES:
        raise ValueError(f"unknown static family {family!r}; valid: {sorted(FAMILIES)}")
    best = None
    for shape in planner.shapes:
        if not FAMILIES[family](shape):
            continue
        t = static_step_s(planner, lengths, shape, parts)
        if t is not None and (best is None or t < best[0]):
            best = (t, shape)
    return best


def all_baselines(
    cost: CostModel, lengths: list[int] | np.ndarray, config: PlannerConfig, plan: StepPlan | None = None
) -> dict[str, float | None]:
    """Step seconds of every baseline for one batch (None where a baseline cannot run it). With the planner's
    ``plan``, static layouts use its micro-step split (the static baseline's definition)."""
    planner = Planner(cost, config)
    arr = check_lengths(lengths, cost, planner.shapes)
    parts = [np.array(sorted(s for g in m.groups for s in g.seqs)) for m in plan.micro_steps] if plan else None
    out: dict[str, float | None] = {}
    for family, name in (("ulysses", "static_ulysses"), ("ring", "static_ring"), ("hybrid", "static_hybrid")):
        res = best_static(planner, arr, family, parts)
        out[name] = res[0] if res else None
    statics = [v for v in out.values() if v is not None]
    out["best_static"] = min(statics) if statics else None
    uly = [s for s in planner.shapes if s.ring == 1]
    try:  # Ulysses alone may not reach a group large enough for the longest sequence (heads cap u)
        out["ulysses_hetero"] = Planner(cost, config, uly).plan(arr).time_s
    except ValueError:
        out["ulysses_hetero"] = None
    out["greedy"] = Planner(cost, PlannerConfig(**{**config.__dict__, "use_milp": False})).plan(arr).time_s
    return out
