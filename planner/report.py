"""Summaries of planned steps: the JSON ``summary`` object and a plain-text table."""

from __future__ import annotations

import numpy as np

from planner.cost import CostModel
from planner.types import StepPlan


def model_flops(cost: CostModel, lengths: tuple[int, ...]) -> float:
    """Useful training FLOPs of a batch (no recomputation counted)."""
    m = cost.model
    arr: np.ndarray = np.asarray(lengths, dtype=float)
    recompute = 4.0 / 3.0 if m.checkpointing == "full" else 1.0
    return float(
        (6.0 * (m.linear_params + m.vocab * m.hidden) * arr).sum() + np.sum(cost.attention_flops(arr)) / recompute
    )


def summarise(cost: CostModel, plans: list[StepPlan], baselines: list[dict[str, float | None]]) -> dict:
    planned = float(np.mean([p.time_s for p in plans]))
    bound = float(np.mean([p.lower_bound_s for p in plans]))
    solve = np.array([p.solve_s for p in plans])
    names = sorted({k for b in baselines for k in b})
    base = {}
    for k in names:
        vals = [b.get(k) for b in baselines]
        base[k] = None if any(v is None for v in vals) else float(np.mean([v for v in vals if v is not None]))
    flops = np.mean([model_flops(cost, p.lengths) for p in plans])
    peak = cost.cluster.peak_tflops * 1e12 * cost.cluster.world
    out = {
        "steps": len(plans),
        "planned_step_s": planned,
        "lower_bound_s": bound,
        "gap": (planned - bound) / planned if planned > 0 else 0.0,
        "gap_max": float(max(p.gap for p in plans)),
        "solve_s_p50": float(np.median(solve)),
        "solve_s_max": float(solve.max()),
        "micro_steps_mean": float(np.mean([len(p.micro_steps) for p in plans])),
        "peak_memory_gib": float(max(p.peak_memory_gib for p in plans)),
        "memory_limit_gib": cost.cluster.memory_gib,
        "estimated_mfu": float(flops / (planned * peak)) if planned > 0 else 0.0,
        "baselines": base,
    }
    for k in ("best_static", "ulysses_hetero", "greedy"):
        ref = base.get(k)
        if ref:
            out[f"speedup_vs_{k}"] = ref / planned
    return out


def plan_json(plan: StepPlan) -> dict:
    return {
        "planned_s": plan.time_s,
        "lower_bound_s": plan.lower_bound_s,
        "gap": plan.gap,
        "solve_s": plan.solve_s,
        "micro_steps": [
            [
                {
                    "ranks": [g.first_rank, g.first_rank + g.shape.size - 1],
                    "strategy": g.shape.strategy,
                    "u": g.shape.ulysses,
                    "r": g.shape.ring,
                    "sequences": [int(plan.lengths[s]) for s in g.seqs],
                    "time_s": g.time_s,
                    "memory_gib": g.memory_gib,
                }
                for g in m.groups
            ]
            for m in plan.micro_steps
        ],
    }


def table(plan: StepPlan, summary: dict) -> str:
    lines = [f"{'micro':>5} {'ranks':>9} {'strategy':>22} {'#seq':>5} {'longest':>8} {'time s':>8} {'mem GiB':>8}"]
    for i, m in enumerate(plan.micro_steps):
        for g in m.groups:
            longest = max(plan.lengths[s] for s in g.seqs)
            ranks = f"{g.first_rank}-{g.first_rank + g.shape.size - 1}"
            lines.append(
                f"{i:>5} {ranks:>9} {str(g.shape):>22} {len(g.seqs):>5} {longest:>8} "
                f"{g.time_s:>8.3f} {g.memory_gib:>8.1f}"
            )
    lines.append("")
    lines.append(
        f"planned step {summary['planned_step_s']:.3f} s | lower bound {summary['lower_bound_s']:.3f} s | "
        f"gap {summary['gap']:.1%} | solve p50 {summary['solve_s_p50'] * 1e3:.0f} ms, "
        f"max {summary['solve_s_max'] * 1e3:.0f} ms"
    )
    lines.append(
        f"peak memory {summary['peak_memory_gib']:.1f} / {summary['memory_limit_gib']} GiB per GPU | "
        f"estimated MFU {summary['estimated_mfu']:.1%}"
    )
    for k, v in summary["baselines"].items():
        speed = f"{v / summary['planned_step_s']:.2f}x" if v else "-"
        lines.append(f"  baseline {k:>15}: {'n/a' if v is None else f'{v:.3f} s'}  (planner speed-up {speed})")
    return "\n".join(lines)
