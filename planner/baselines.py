"""Baselines, through the same cost model and the same micro-step split as the planner.

- **Static layouts**: one (u, r) shape, as many identical groups as fit (data parallel across them; a size
  that does not divide the world leaves GPUs idle, as a fixed-layout system would run it), sequences
  longest-first to the group that finishes first (a strong balancer, never a round-robin strawman), on the
  planner's micro-step split (the layout's own searched split where a part does not fit it).
  :func:`all_baselines` times every layout on one batch; :func:`planner.report.summarise` then forms
  - ``static``: the layout Megatron CP / DeepSpeed-Ulysses users configure, chosen ONCE for the whole run:
    the best mean step over the sampled batches among the layouts whose groups hold ``lengths.max_len``
    (``static_ulysses`` / ``static_ring`` / ``static_hybrid``: the same within one family);
  - ``oracle_static``: the best layout chosen per batch (holding that batch's longest sequence), a stronger,
    unrealistic reference.
- ``ulysses_hetero``: FlexSP's setting, heterogeneous group sizes but Ulysses only, planned by our planner.
- ``greedy``: our planner without the MILP (fluid sizing, list scheduling, local search, split search).
"""

from __future__ import annotations

import re

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


def layout_key(shape: GroupShape) -> str:
    return f"u{shape.ulysses}r{shape.ring}"


def parse_layout(key: str) -> GroupShape:
    m = re.fullmatch(r"u(\d+)r(\d+)", key)
    if m is None:
        raise ValueError(f"layout key {key!r}; valid: 'u<ulysses>r<ring>', e.g. 'u8r4'")
    return GroupShape(int(m.group(1)), int(m.group(2)))


def static_step_s(
    planner: Planner, lengths: np.ndarray, shape: GroupShape, parts: list[np.ndarray] | None = None
) -> float | None:
    """Step time of one static layout, or None when its groups cannot hold the longest sequence. The layout
    runs with the first memory mode the planner may use (the model's own settings first) that holds the
    batch's longest sequence on its groups: a static system is configured with the least technique its
    sequences need."""
    for mode in planner.modes:
        cost = planner.costs[mode]
        if lengths.max() > cost.tokens_capacity(shape.size, shape):
            continue
        try:
            return static_plan(cost, lengths, shape, parts).time_s
        except ValueError:
            continue
    return None


def all_baselines(
    cost: CostModel, lengths: list[int] | np.ndarray, config: PlannerConfig, plan: StepPlan | None = None
) -> dict:
    """One batch: ``layouts`` {"u<u>r<r>": step seconds or None} for every static layout (on the planner's
    split when ``plan`` is given), ``ulysses_hetero`` and ``greedy`` step seconds (None where they cannot
    run the batch)."""
    planner = Planner(cost, config)
    arr = check_lengths(lengths, planner.roomiest, planner.shapes)  # the roomiest mode the planner may use
    parts = [np.array(sorted(s for g in m.groups for s in g.seqs)) for m in plan.micro_steps] if plan else None
    out: dict = {"layouts": {layout_key(s): static_step_s(planner, arr, s, parts) for s in planner.shapes}}
    out["capacity"] = {
        layout_key(s): max(c.tokens_capacity(s.size, s) for c in planner.costs.values()) for s in planner.shapes
    }
    uly = [s for s in planner.shapes if s.ring == 1]
    try:  # Ulysses alone may not reach a group large enough for the longest sequence (heads cap u)
        out["ulysses_hetero"] = Planner(cost, config, uly).plan(arr).time_s
    except ValueError:
        out["ulysses_hetero"] = None
    out["greedy"] = Planner(cost, PlannerConfig(**{**config.__dict__, "use_milp": False})).plan(arr).time_s
    return out


def run_static(
    cost: CostModel, per_batch: list[dict], max_len: int, family: str = "any"
) -> tuple[str, list[float]] | None:
    """The static baseline: ONE layout for the whole run, the best mean step over the batches among the
    layouts of ``family`` whose groups hold ``max_len``; (its key, its step seconds per batch), or None."""
    if family not in FAMILIES:
        raise ValueError(f"unknown static family {family!r}; valid: {sorted(FAMILIES)}")
    best: tuple[str, list[float]] | None = None
    for key in per_batch[0]["layouts"] if per_batch else []:
        shape = parse_layout(key)
        capacity = per_batch[0].get("capacity", {}).get(key, cost.tokens_capacity(shape.size, shape))  # roomiest mode's
        if not FAMILIES[family](shape) or capacity < max_len:
            continue
        times = [b["layouts"].get(key) for b in per_batch]
        if any(t is None for t in times):
            continue  # cannot run some batch (out of memory)
        if best is None or np.mean(times) < np.mean(best[1]):
            best = (key, [float(t) for t in times])
    return best


def oracle_static(per_batch: list[dict]) -> list[float] | None:
    """The best layout chosen per batch (an unrealistic reference): step seconds per batch."""
    out = []
    for b in per_batch:
        ts = [t for t in b["layouts"].values() if t is not None]
        if not ts:
            return None
        out.append(min(ts))
    return out
