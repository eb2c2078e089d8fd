"""Summaries of planned steps: the JSON ``summary`` object and a plain-text table."""

from __future__ import annotations

import math

import numpy as np

from planner.baselines import oracle_static, run_static
from planner.cost import CostModel
from planner.run_cost import run_cost
from planner.types import GroupShape, ModelShape, StepPlan


def model_flops(cost: CostModel, lengths: tuple[int, ...]) -> float:
    """Useful training FLOPs of a batch (no recomputation counted)."""
    m = cost.model
    arr: np.ndarray = np.asarray(lengths, dtype=float)
    attention = np.sum(cost.attention_flops(arr, recompute=False))
    return float((6.0 * (m.linear_params + m.vocab * m.hidden) * arr).sum() + attention)


def summarise(
    cost: CostModel, plans: list[StepPlan], baselines: list[dict], max_len: int | None = None,
    run_tokens: float | None = None,
) -> dict:  # fmt: skip
    """The JSON ``summary``: planned step, bound and gap, solve times, split statistics, memory, baselines
    (``static`` = one layout for the run holding ``max_len``, default the longest sampled sequence;
    ``oracle_static`` = best layout per batch) and, with ``run_tokens``, the run-cost estimate."""
    planned = float(np.mean([p.time_s for p in plans]))
    bound = float(np.mean([p.lower_bound_s for p in plans]))
    solve = np.array([p.solve_s for p in plans])
    flops = [model_flops(cost, p.lengths) for p in plans]
    peak = cost.cluster.peak_tflops * 1e12 * cost.cluster.world
    capacity = cost.tokens_capacity(1, GroupShape(1, 1)) * cost.cluster.world  # per layout, as the planner's floor
    floors = [max(1, math.ceil(sum(p.lengths) / capacity - 1e-9)) for p in plans]
    out = {
        "steps": len(plans),
        "planned_step_s": planned,
        "lower_bound_s": bound,
        "gap": (planned - bound) / planned if planned > 0 else 0.0,
        "gap_max": float(max(p.gap for p in plans)),
        "split_gap": float(np.mean([(p.time_s - p.split_bound_s) / p.time_s for p in plans])),
        "solve_s_p50": float(np.median(solve)),
        "solve_s_max": float(solve.max()),
        "micro_steps_mean": float(np.mean([len(p.micro_steps) for p in plans])),
        "micro_steps_over_floor_mean": float(np.mean([len(p.micro_steps) - f for p, f in zip(plans, floors)])),
        "splits": {k: sum(p.split == k for p in plans) for k in sorted({p.split for p in plans})},
        "peak_memory_gib": float(max(p.peak_memory_gib for p in plans)),
        "memory_limit_gib": cost.cluster.memory_gib,
        "memory_gib": _peak_breakdown(cost, plans),
        "memory_gib_mode": max(plans, key=lambda p: p.peak_memory_gib).peak_group()[0].mode(cost.model).label,
        "memory_modes": _memory_modes(cost, plans),
        "fsdp_comm_s_per_micro_step": cost.fsdp_time.comm_s,  # all-gathers + reduce-scatters, before overlap
        "fsdp_exposed_s": float(np.mean([sum(m.fsdp_exposed_s for m in p.micro_steps) for p in plans])),
        "estimated_mfu": float(np.mean(flops) / (planned * peak)) if planned > 0 else 0.0,
        "attention_kernel": _kernel(cost),
        "constants_source": _source(cost),
        "flops_per_step": {
            k: float(np.mean([cost.flops_terms(p.lengths)[k] for p in plans]))
            for k in cost.flops_terms(plans[0].lengths)
        },  # fmt: skip
        "parameters": _parameters(cost.model),
        "states_gib": _states(cost),
    }
    base, series = _baselines(cost, plans, baselines, max_len or max(max(p.lengths) for p in plans))
    out["baselines"] = base
    for k in ("static", "oracle_static", "ulysses_hetero", "greedy"):
        if base.get(k):
            out[f"speedup_vs_{k}"] = base[k] / planned
    if run_tokens:
        cl = cost.cluster
        tokens = [float(sum(p.lengths)) for p in plans]
        run: dict = {"tokens": run_tokens, "usd_per_gpu_hour": cl.usd_per_gpu_hour}
        for name, times in (("adaptive", [p.time_s for p in plans]), ("static", series.get("static"))):
            if times is not None:
                run[name] = run_cost(times, tokens, flops, run_tokens, cl.world, cl.peak_tflops, cl.usd_per_gpu_hour)
        out["run"] = run
    return out


def _kernel(cost: CostModel) -> str:
    """The attention kernel the times assume, with its stated speeds."""
    cl = cost.cluster
    if cl.alpha1_ms is not None:
        return "fitted constants (alpha1): the kernel of the run that measured them"
    if not cl.attention_kernel:
        return f"none stated: attention at the cluster's mfu ({cl.mfu:.0%} of {cl.peak_tflops:g} TFLOP/s)"
    r = cl.attention_tflops[cl.attention_kernel]
    return f"{cl.attention_kernel} (forward {r['fwd']:g}, backward {r['bwd']:g} TFLOP/s, standard count)"


def _source(cost: CostModel) -> str:
    """Where the constants come from, so that nobody reads a dry run as a measurement."""
    cl = cost.cluster
    if cl.calibration:
        from planner.calibration import describe

        return describe(cl.calibration)
    return cl.constants_source or f"cluster profile {cl.name!r} (stated, not measured here)"


def _parameters(m: ModelShape) -> dict[str, int]:
    """Weights: all of them (states and FSDP traffic count these), the ones a token goes through (FLOPs count
    these: attention, dense MLPs, the router and top-k experts of MoE layers, the output layer), and the
    experts' share."""
    per = 3 if m.swiglu else 2
    experts = len(m.moe_layers()) * m.experts * per * m.hidden * m.expert_ffn
    return {"total": m.params, "active_per_token": m.linear_params + m.vocab * m.hidden, "experts": experts}


def _states(cost: CostModel) -> dict[str, float | str]:
    """This rank's fp32 states by kind (GiB): parameters 4, gradients 4, AdamW moments 8 bytes per element."""
    total = cost.state_bytes(0) / 2**30
    where = "host" if cost.state_offload else "gpu"
    return {"params": total / 4, "grads": total / 4, "optimizer": total / 2, "total": total, "where": where,
            "host_optimizer_s": cost.host_optimizer_s()}  # fmt: skip


def _peak_breakdown(cost: CostModel, plans: list[StepPlan]) -> dict[str, float]:
    """Memory per GPU by part for the busiest group of all plans, under its micro-step's memory mode."""
    plan = max(plans, key=lambda p: p.peak_memory_gib)
    micro, group = plan.peak_group()
    local = sum(plan.lengths[s] for s in group.seqs) / group.shape.size
    return cost.for_micro(micro).memory_breakdown_gib(local, group.shape)


def _memory_modes(cost: CostModel, plans: list[StepPlan]) -> dict[str, int]:
    """How many micro-steps of the plans run with each memory mode (``full``, ``offload, loss chunk 2048``)."""
    labels = [m.mode(cost.model).label for p in plans for m in p.micro_steps]
    return {k: labels.count(k) for k in sorted(set(labels))}


def _baselines(
    cost: CostModel, plans: list[StepPlan], per_batch: list[dict], max_len: int
) -> tuple[dict, dict[str, list[float]]]:
    """Mean step seconds per baseline (None where it cannot run every batch) and the per-batch series."""
    series: dict[str, list[float]] = {}
    base: dict = {}
    if not per_batch or not per_batch[0]:
        return base, series
    for family, name in (("any", "static"), ("ulysses", "static_ulysses"), ("ring", "static_ring"),
                         ("hybrid", "static_hybrid")):  # fmt: skip
        found = run_static(cost, per_batch, max_len, family)
        base[name] = float(np.mean(found[1])) if found else None
        if found:
            series[name] = found[1]
            base[f"{name}_layout"] = found[0]
    oracle = oracle_static(per_batch)
    base["oracle_static"] = float(np.mean(oracle)) if oracle else None
    for k in ("ulysses_hetero", "greedy"):
        vals = [b.get(k) for b in per_batch]
        known = [float(v) for v in vals if v is not None]
        base[k] = float(np.mean(known)) if len(known) == len(vals) else None
    return base, series


def plan_json(plan: StepPlan, model: ModelShape) -> dict:
    """A plan as JSON; every group names its micro-step's memory mode (checkpointing, loss chunk, sequence tile)."""
    return {
        "planned_s": plan.time_s,
        "lower_bound_s": plan.lower_bound_s,
        "gap": plan.gap,
        "split_bound_s": plan.split_bound_s,
        "split": plan.split,
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
                    "checkpointing": m.mode(model).checkpointing,
                    "loss_chunk_tokens": m.mode(model).loss_chunk_tokens,
                    "tile_tokens": m.mode(model).tile_tokens,
                }
                for g in m.groups
            ]
            for m in plan.micro_steps
        ],
        "fsdp_exposed_s": [m.fsdp_exposed_s for m in plan.micro_steps],
    }


def table(plan: StepPlan, summary: dict) -> str:
    head = f"{'micro':>5} {'ranks':>9} {'strategy':>22} {'#seq':>5} {'longest':>8} {'time s':>8} {'mem GiB':>8}"
    lines = [head + (" memory mode" if any(m.memory for m in plan.micro_steps) else "")]
    for i, m in enumerate(plan.micro_steps):
        for g in m.groups:
            longest = max(plan.lengths[s] for s in g.seqs)
            ranks = f"{g.first_rank}-{g.first_rank + g.shape.size - 1}"
            lines.append(
                f"{i:>5} {ranks:>9} {str(g.shape):>22} {len(g.seqs):>5} {longest:>8} "
                f"{g.time_s:>8.3f} {g.memory_gib:>8.1f} {m.memory.label if m.memory else ''}".rstrip()
            )
    lines.append("")
    lines.append(
        f"planned step {summary['planned_step_s']:.3f} s | lower bound {summary['lower_bound_s']:.3f} s | "
        f"gap {summary['gap']:.1%} | solve p50 {summary['solve_s_p50'] * 1e3:.0f} ms, "
        f"max {summary['solve_s_max'] * 1e3:.0f} ms"
    )
    lines.append(
        f"peak memory {summary['peak_memory_gib']:.1f} / {summary['memory_limit_gib']} GiB per GPU "
        f"({summary['memory_gib_mode']}) | estimated MFU {summary['estimated_mfu']:.1%} | FSDP "
        f"{summary['fsdp_comm_s_per_micro_step']:.3f} s per micro-step, {summary['fsdp_exposed_s']:.3f} s exposed"
    )
    st = summary["states_gib"]
    if st["where"] != "gpu":
        lines.append(f"optimizer states in host memory (planner.state_offload): {st['total']:.1f} GiB per GPU, "
                     f"AdamW on the host {st['host_optimizer_s']:.2f} s per step")  # fmt: skip
    lines.append(f"attention kernel {summary['attention_kernel']} | constants: {summary['constants_source']}")
    for k, v in summary["baselines"].items():
        if k.endswith("_layout"):
            continue
        speed = f"{v / summary['planned_step_s']:.2f}x" if v else "-"
        layout = summary["baselines"].get(f"{k}_layout", "")
        lines.append(f"  baseline {k:>15}: {'n/a' if v is None else f'{v:.3f} s'}  (planner speed-up {speed}) {layout}")
    for name, r in summary.get("run", {}).items():
        if isinstance(r, dict):
            usd = f", ${r['usd']['p50']:,.0f} ({r['usd']['p10']:,.0f}-{r['usd']['p90']:,.0f})" if r["usd"] else ""
            lines.append(
                f"  run {name:>9}: {r['steps']:,} steps, {r['wall_hours']['p50']:,.1f} h wall "
                f"(p10-p90 {r['wall_hours']['p10']:,.1f}-{r['wall_hours']['p90']:,.1f}), "
                f"{r['gpu_hours']['p50']:,.0f} GPU-h{usd}, {r['tokens_per_s_per_gpu']['p50']:,.0f} tok/s/GPU, "
                f"MFU {r['mfu']['p50']:.1%}"
            )
    return "\n".join(lines)
