"""Gantt picture of one planned step: one row per SP group, one bar per sequence, colour per strategy."""

from __future__ import annotations

from planner.cost import CostModel
from planner.types import StepPlan

COLOURS = {"none": "#9e9e9e", "ulysses": "#1f77b4", "ring": "#d62728", "hybrid": "#9467bd"}


def draw_gantt(plan: StepPlan, cost: CostModel, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = max(len(m.groups) for m in plan.micro_steps)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.32 * rows))
    x0 = 0.0
    for mi, micro in enumerate(plan.micro_steps):
        for row, g in enumerate(micro.groups):
            t = x0 + cost.beta_s
            ax.barh(row, cost.beta_s, left=x0, color="#eeeeee", edgecolor="none")
            for s in sorted(g.seqs, key=lambda s: -plan.lengths[s]):
                d = float(cost.seq_time_s(float(plan.lengths[s]), g.shape))
                ax.barh(row, d, left=t, color=COLOURS[g.shape.strategy], edgecolor="white", linewidth=0.5)
                if d > 0.06 * plan.time_s:
                    ax.text(
                        t + d / 2, row, f"{plan.lengths[s] // 1024}K", ha="center", va="center", fontsize=7, color="w"
                    )
                t += d
        x0 += micro.time_s
        if mi + 1 < len(plan.micro_steps):
            ax.axvline(x0, color="k", linestyle="--", linewidth=0.8)
    labels = [f"{g.shape} @{g.first_rank}" for g in max(plan.micro_steps, key=lambda m: len(m.groups)).groups]
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (micro-steps separated by dashed lines; grey = fixed per-group cost)")
    head = f"step {plan.time_s:.2f} s, bound {plan.lower_bound_s:.2f} s, gap {plan.gap:.1%}"
    ax.set_title(f"{title}  {head}" if title else head, fontsize=10)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
