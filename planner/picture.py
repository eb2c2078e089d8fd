"""Gantt picture of one planned step: GPUs on the y axis (each SP group a band over its ranks, labelled
u x r; dotted lines between nodes), time on the x axis, one bar per sequence, colour per strategy, micro-steps
separated by dashed lines and labelled with their checkpointing mode where the plan mixes modes or offloads."""

from __future__ import annotations

from planner.cost import CostModel
from planner.types import MemoryMode, StepPlan

COLOURS = {"none": "#9e9e9e", "ulysses": "#1f77b4", "ring": "#d62728", "hybrid": "#9467bd"}
GAP = 0.08  # rows of white between two groups' bands, whatever their size


def band(first_rank: int, size: int) -> tuple[float, float]:
    """(top, height) of a group's band: its rows to scale, less a fixed gap at the edges (a group of 64
    GPUs ends at row 63.96, not at 59 as a band of 0.92 of its height did)."""
    return first_rank + GAP / 2, size - GAP


def draw_gantt(plan: StepPlan, cost: CostModel, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    world = cost.cluster.world
    fig, ax = plt.subplots(figsize=(12, 2.0 + min(0.12 * world, 10)))
    x0 = 0.0
    modes = {m.mode(cost.model) for m in plan.micro_steps}
    for mi, micro in enumerate(plan.micro_steps):
        mode = micro.mode(cost.model)
        c = cost.with_mode(mode)  # each micro-step timed under its own memory mode (offload, loss chunk, ...)
        if len(modes) > 1 or mode != MemoryMode.of(cost.model) or mode.checkpointing == "offload":
            ax.text(x0 + micro.time_s / 2, 0.02 * world, mode.label, ha="center", va="top", fontsize=7)
        for g in micro.groups:
            y, h = band(g.first_rank, g.shape.size)  # a group spans the rows of its GPUs
            fixed = c.group_overhead_s(g.shape)
            ax.barh(y, fixed, left=x0, height=h, align="edge", color="#eeeeee", edgecolor="none")
            t = x0 + fixed
            for s in sorted(g.seqs, key=lambda s: -plan.lengths[s]):
                d = float(c.seq_time_s(float(plan.lengths[s]), g.shape))
                ax.barh(y, d, left=t, height=h, align="edge", color=COLOURS[g.shape.strategy], edgecolor="white",
                        linewidth=0.5)  # fmt: skip
                if d > 0.05 * plan.time_s and h >= 0.9:
                    ax.text(t + d / 2, y + h / 2, f"{plan.lengths[s] / 1024:.0f}K", ha="center", va="center",
                            fontsize=7, color="w")  # fmt: skip
                t += d
            if g.shape.size > 1:  # inside the band, right of its fixed cost (never over the axis)
                ax.text(x0 + fixed, y + 0.1, f" u{g.shape.ulysses}r{g.shape.ring}", ha="left", va="top", fontsize=6,
                        bbox={"facecolor": "white", "alpha": 0.7, "pad": 0.5, "edgecolor": "none"})  # fmt: skip
        if micro.fsdp_exposed_s > 0:  # FSDP's collectives not hidden: every rank waits
            ax.barh(0, micro.fsdp_exposed_s, left=x0 + micro.groups_s, height=world, align="edge", color="#bbbbbb",
                    hatch="//", edgecolor="white", linewidth=0)  # fmt: skip
        x0 += micro.time_s
        if mi + 1 < len(plan.micro_steps):
            ax.axvline(x0, color="k", linestyle="--", linewidth=0.8)
    for node in range(1, cost.cluster.nodes):  # node boundaries: a group stays inside a node or spans whole nodes
        ax.axhline(node * cost.cluster.gpus_per_node, color="#444444", linewidth=0.6, linestyle=":")
    ax.set_ylim(0, world)
    ax.set_ylabel("GPU rank (a group spans its ranks; dotted: node boundaries)")
    ax.invert_yaxis()
    ax.set_xlabel("seconds (micro-steps separated by dashed lines; grey = fixed per-group cost; hatched = FSDP "
                  "collectives not hidden)")  # fmt: skip
    head = f"step {plan.time_s:.2f} s, bound {plan.lower_bound_s:.2f} s, gap {plan.gap:.1%}"
    ax.set_title(f"{title}  {head}" if title else head, fontsize=10)
    ax.legend(
        handles=[Patch(color=c, label=k) for k, c in COLOURS.items()],
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
        fontsize=7,
        title="strategy",
        title_fontsize=7,
    )  # beside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
