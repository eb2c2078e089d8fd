"""``sp-bench e2e``: real training steps on CPU ranks, adaptive plans vs every static layout, interleaved.

Every step draws one batch of documents (random tokens; lengths from the length file, times ``scale``,
clipped to ``max_len``, filled to ``tokens_per_step``) and runs it once per strategy on the same weights
(forward, backward, gradient all-reduce), then takes one optimizer step. Before that, each rank calibrates
the cost model on the machine at hand: the model's fwd+bwd time at a few lengths (fits alpha1, alpha2, beta)
and all-to-all / P2P bandwidth (``trainer.profile``), then the constants are rescaled by a least-squares fit of
whole plans' measured step times (two calibration batches of their own) on their predictions. Each rank is
given the memory of ``max_len / 2`` tokens, so the longest documents need SP and the static layouts are
those whose groups hold ``max_len``. Reported:
tokens/s per strategy, and the median |predicted - measured| / measured step time per strategy.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

TINY = dict(name="e2e", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
            checkpointing="none", bytes_per_value=4)  # fmt: skip
STATIC = [(1, 1), (2, 1), (1, 2), (4, 1), (1, 4), (2, 2)]


def _fit(lengths: list[int], times: list[float]) -> tuple[float, float, float]:
    x = np.array(lengths, dtype=float)
    a = np.stack([x**2, x, np.ones_like(x)], 1)
    coef, *_ = np.linalg.lstsq(a, np.array(times), rcond=None)
    a1, a2, b = (max(float(c), 0.0) for c in coef)
    return a1 * 1e3, a2 * 1e3, b * 1e3  # ms


def _worker(rank: int, world: int, pool_lengths: np.ndarray, steps: int, tokens: int, max_len: int, seed: int,
            recalibrate: int = 0, statics: bool = True):  # fmt: skip
    from megatron.core import parallel_state

    from models.gpt import build_gpt
    from planner.cost import CostModel
    from planner.planner import Planner, PlannerConfig
    from planner.static import static_plan
    from planner.types import Cluster, GroupShape, ModelShape, StepPlan
    from sp.groups import GroupPool
    from trainer.calibrate import log_line
    from trainer.grad_sync import GradSync
    from trainer.profile import measure as measure_comm
    from trainer.step import run_plan

    parallel_state.initialize_model_parallel(1, 1)
    shape = ModelShape(**TINY)
    model = build_gpt(shape, max_len, seed=0)
    pool = GroupPool()
    sync = GradSync(list(model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)

    def docs_of(lengths):
        return [rng.integers(0, 256, size=n + 1) for n in lengths]

    def timed(plan: StepPlan, docs) -> float:
        return timed_gathered(plan, docs)[0]

    def timed_gathered(plan: StepPlan, docs) -> tuple[float, np.ndarray, np.ndarray]:
        """The step's seconds, and every rank's busy and attention seconds per micro-step ([world, micro])."""
        dist.barrier()
        t0 = time.perf_counter()
        stats = run_plan(model, pool, plan, docs, rank, sync)
        dist.barrier()
        t = time.perf_counter() - t0
        n = len(stats.busy_s)
        out = torch.zeros(world, 2 * n, dtype=torch.float64)
        dist.all_gather_into_tensor(out, torch.tensor([stats.busy_s + stats.attention_s], dtype=torch.float64))
        return t, out[:, :n].numpy(), out[:, n:].numpy()

    # ---- calibration: every rank at once (the contention of real training), world-1 plans ----
    cal_lengths = [256, 1024, 2048, 4096, 8192]
    cal_times = []
    solo = Cluster(name="solo", nodes=1, gpus_per_node=1, peak_tflops=1.0, mfu=1.0, memory_gib=64.0)
    for n in cal_lengths:
        docs = docs_of([n])
        plan = static_plan(CostModel(solo, shape), [n], GroupShape(1, 1))
        for _ in range(2):  # the second run counts
            dist.barrier()
            t0 = time.perf_counter()
            run_plan(model, _SoloPool(pool), plan, docs, 0, sync)
            t = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        cal_times.append(t)
    times = torch.tensor(cal_times, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    a1, a2, beta = _fit(cal_lengths, times.tolist())
    comm = measure_comm(rank, world, 4.0)
    # each rank is a "device" that holds max_len / 2 tokens: the longest documents need SP (as on GPUs)
    probe = CostModel(Cluster(name="p", nodes=1, gpus_per_node=world, memory_gib=1.0), shape)
    mem = probe.states_gib() + probe.act_bytes_per_token * max_len / 2 / 2**30
    cluster = Cluster(name="cpu-calibrated", nodes=1, gpus_per_node=world, peak_tflops=1.0, mfu=1.0, memory_gib=mem,
                      alpha1_ms=a1, alpha2_ms=a2, beta_ms=beta, a2a_gbs=comm["a2a_gbs"], p2p_gbs=comm["p2p_gbs"],
                      intra_gbs=min(comm["a2a_gbs"].values()), inter_gbs=min(comm["a2a_gbs"].values()),
                      intra_latency_us=comm["latency_us"], inter_latency_us=comm["latency_us"])  # fmt: skip

    def batch():
        lengths, used = [], 0
        while used < tokens:
            n = int(min(max(2, rng.choice(pool_lengths)), max_len, tokens - used if lengths else max_len))
            lengths.append(n)
            used += n
        return lengths

    def plans_for(cost, lengths, adaptive=None, with_statics=True):
        """Planned on rank 0 and broadcast, as the trainer does: the planner's search is time-capped, so
        ranks planning on their own could choose different plans and wait in different collectives.
        ``adaptive``: {name: cost model} of the adaptive variants (default: one, ``cost``)."""
        box: list = [None]
        if dist.get_rank() == 0:
            plans = {n: Planner(c, PlannerConfig(time_limit_s=0.5)).plan(lengths)
                     for n, c in (adaptive or {"adaptive": cost}).items()}  # fmt: skip
            for u, r in STATIC if with_statics else ():
                if cost.tokens_capacity(u * r, GroupShape(u, r)) >= max_len:  # static layouts whose groups hold max_len
                    plans[f"static_u{u}_r{r}"] = static_plan(cost, lengths, GroupShape(u, r))
            box[0] = plans
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- calibration, part 2: regress measured steps of whole plans (own batches) on their predictions ----
    cost = CostModel(cluster, shape)
    xs, ys = [], []
    for _ in range(2):
        lengths = batch()
        docs = docs_of(lengths)
        for plan in plans_for(cost, lengths).values():
            ys.append(timed(plan, docs))
            xs.append(plan.time_s)
            opt.zero_grad(set_to_none=True)
    meas = torch.tensor(ys, dtype=torch.float64)
    dist.all_reduce(meas, op=dist.ReduceOp.MAX)
    (k, b), *_ = np.linalg.lstsq(np.stack([np.array(xs), np.ones(len(xs))], 1), meas.numpy(), rcond=None)
    k, b = max(float(k), 1e-3), float(b)
    scaled = {"alpha1_ms": a1 * k, "alpha2_ms": a2 * k, "beta_ms": max(beta * k + b * 1e3, 0.0)}
    scaled_bw = {"a2a_gbs": {s: v / k for s, v in cluster.a2a_gbs.items()},
                 "p2p_gbs": {s: v / k for s, v in cluster.p2p_gbs.items()}}  # fmt: skip
    cost = CostModel(replace(cluster, **scaled, **scaled_bw), shape)
    # ---- interleaved steps; with ``recalibrate``, adaptive variants that re-fit online (rank 0) ----
    models, cals = _variants(cost, recalibrate, world) if rank == 0 else ({}, {})
    rows: dict[str, list[tuple[float, float, int]]] = {}
    for step in range(steps):
        lengths = batch()
        docs = docs_of(lengths)
        for name, plan in plans_for(cost, lengths, models or None, statics).items():
            t, busy, attn = timed_gathered(plan, docs)
            cal = cals.get(name)
            predicted = plan.time_s + (models[name].step_overhead_s if name in models else 0.0)
            rows.setdefault(name, []).append((t, predicted, sum(lengths)))
            if cal is not None:
                cal.record(step, plan, busy, attn, t)
                if cal.due(step):
                    res = cal.refit(step)
                    print(f"[e2e] {log_line(step, res).split('] ', 1)[1]} ({name})", flush=True)
                    models[name] = cal.cost
            if name != "adaptive":
                opt.zero_grad(set_to_none=True)
        opt.step()  # one update per batch (the gradients of the last strategy run)
        opt.zero_grad(set_to_none=True)
    calib = {"solo_alpha1_ms": a1, "solo_alpha2_ms": a2, "solo_beta_ms": beta, "plan_fit_scale": k,
             "plan_fit_offset_s": b, **scaled, **comm}  # fmt: skip
    fits = {n: [{"step": (i + 1) * recalibrate, "accepted": r.accepted, "reason": r.reason, **r.error_after}
                for i, r in enumerate(c.history)] for n, c in cals.items()}  # fmt: skip
    return {"calibration": calib, "rows": rows, "fits": fits}


def _variants(cost, every: int, world: int) -> tuple[dict, dict]:
    """The adaptive planners of a recalibration run: ``adaptive`` (offline calibration, fixed, as without
    recalibration), ``adaptive_recal`` (the same start, re-fit every ``every`` steps), ``yaml`` and
    ``yaml_recal`` (the shipped ``configs/cluster/cpu.yaml`` constants, fixed / re-fit: a run without
    sp-profile). Both YAML variants get the calibrated cluster's memory, so every plan obeys the same limit."""
    import tempfile
    from pathlib import Path

    from benchmarks.capacity import config_fields
    from planner.cost import CostModel
    from planner.planner import PlannerConfig
    from planner.types import Cluster
    from trainer.calibrate import OnlineCalibrator

    if not every:
        return {}, {}
    fields = {**config_fields("cluster", "cpu"), "gpus_per_node": world, "memory_gib": cost.cluster.memory_gib}
    shipped = CostModel(Cluster(**fields), cost.model)
    models = {"adaptive": cost, "adaptive_recal": cost, "yaml": shipped, "yaml_recal": shipped}
    cfg = PlannerConfig(recalibrate_every=every, recalibrate_window=30)
    folder = Path(tempfile.mkdtemp(prefix="e2e-calibration-"))
    hw = {"device": "cpu", "world": world}
    cals = {n: OnlineCalibrator(models[n], cfg, folder / n, hw) for n in ("adaptive_recal", "yaml_recal")}
    for c in cals.values():
        c.out.mkdir()
    return models, cals


class _SoloPool:
    """Calibration runs every rank as its own group of one."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def prepare(self, groups) -> int:
        return 0

    def context(self, ranks, u, r, cu, **kw):
        from sp.context import SPContext
        from sp.layout import GroupLayout

        return SPContext(GroupLayout.build(cu, 1, 1), 0)


def run(lengths_path: str, steps: int, tokens: int, max_len: int, scale: float, seed: int, recalibrate: int = 0,
        statics: bool = True) -> dict:  # fmt: skip
    from planner.lengths import read_lengths
    from sp.spawn import run_distributed

    pool = np.minimum(read_lengths(lengths_path) * scale, max_len).astype(np.int64)
    res = run_distributed(_worker, 4, pool, steps, tokens, max_len, seed, recalibrate, statics, timeout=3000)[0]
    out = {"bench": "e2e", "world": 4, "steps": steps, "tokens_per_step": tokens, "max_len": max_len,
           "length_scale": scale, "recalibrate_every": recalibrate, "calibration": res["calibration"],
           "strategies": {}, "fits": res["fits"]}  # fmt: skip
    for name, rows in res["rows"].items():
        measured = np.array([r[0] for r in rows])
        predicted = np.array([r[1] for r in rows])
        toks = sum(r[2] for r in rows)
        out["strategies"][name] = {
            "tokens_per_s": toks / measured.sum(),
            "step_s_mean": float(measured.mean()),
            "predicted_step_s_mean": float(predicted.mean()),
            "median_rel_error": float(np.median(np.abs(predicted - measured) / measured)),
        }
        err = np.abs(predicted - measured) / measured
        for lo, hi in ((1, 10), (11, 30), (21, 30)):  # prediction error and step time by window of steps
            if len(err) >= lo:
                w = slice(lo - 1, hi)
                out["strategies"][name][f"steps_{lo}_{hi}"] = {
                    "median_rel_error": float(np.median(err[w])), "p90_rel_error": float(np.percentile(err[w], 90)),
                    "step_s_mean": float(measured[w].mean())}  # fmt: skip
    statics = {k: v for k, v in out["strategies"].items() if k.startswith("static")}
    if statics:
        best = max(statics, key=lambda k: statics[k]["tokens_per_s"])
        out["best_static"] = best
        out["speedup_vs_best_static"] = out["strategies"]["adaptive"]["tokens_per_s"] / statics[best]["tokens_per_s"]
    out["median_rel_error_all"] = float(np.median([v["median_rel_error"] for v in out["strategies"].values()]))
    return out
