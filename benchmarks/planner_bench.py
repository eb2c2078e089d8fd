"""``sp-bench planner``: planner vs baselines on real length data, and solve time at scale."""

from __future__ import annotations

import time

import numpy as np

from planner.baselines import all_baselines
from planner.cost import CostModel
from planner.lengths import read_lengths, sample_steps
from planner.planner import Planner, PlannerConfig
from planner.report import summarise
from planner.types import Cluster, ModelShape

A100X64_FLEXSP = Cluster(
    name="a100x64_flexsp", nodes=8, gpus_per_node=8, peak_tflops=312.0, memory_gib=28.0, alpha1_ms=5.128e-6,
    alpha2_ms=0.184, beta_ms=629.0, a2a_gbs={2: 119.5, 4: 104.1, 8: 96.5, 16: 10.3, 32: 5.9, 64: 4.9},
    intra_gbs=119.5, inter_gbs=10.3, act_bytes_per_token=4.71 * 2**20,
)  # fmt: skip
GPT_7B = ModelShape(name="gpt-7b", layers=32, hidden=4096, heads=64, head_dim=64, ffn=16384, vocab=32000,
                    swiglu=False, checkpointing="selective")  # fmt: skip
CONFIG = PlannerConfig(time_limit_s=0.1, milp_time_limit_s=0.03, max_probes=5)  # configs/planner/default.yaml


def quality(path: str, steps: int, global_batch: int, max_len: int, seed: int) -> dict:
    cost = CostModel(A100X64_FLEXSP, GPT_7B)
    batches = sample_steps(read_lengths(path), global_batch, steps, max_len, seed, clip=True)
    planner = Planner(cost, CONFIG)
    plans = [planner.plan(b) for b in batches]
    bases = [all_baselines(cost, b, CONFIG, p) for b, p in zip(batches, plans)]
    s = summarise(cost, plans, bases)
    return {"bench": "planner_quality", "cluster": "a100x64_flexsp", "model": "gpt-7b", "global_batch": global_batch,
            "max_len": max_len, "tokens_per_step_mean": float(np.mean([b.sum() for b in batches])), **s}  # fmt: skip


def scale(path: str, n_seqs: int, nodes: int, steps: int, max_len: int, seed: int) -> dict:
    cluster = Cluster(**{**A100X64_FLEXSP.__dict__, "name": f"a100x{nodes * 8}", "nodes": nodes})
    cost = CostModel(cluster, GPT_7B)
    batches = sample_steps(read_lengths(path), n_seqs, steps, max_len, seed, clip=True)
    planner = Planner(cost, CONFIG)
    solve, gaps = [], []
    for b in batches:
        t0 = time.perf_counter()
        p = planner.plan(b)
        solve.append(time.perf_counter() - t0)
        gaps.append(p.gap)
    return {"bench": "planner_scale", "sequences": n_seqs, "gpus": cluster.world, "steps": steps,
            "solve_s_p50": float(np.median(solve)), "solve_s_max": float(np.max(solve)),
            "gap_mean": float(np.mean(gaps))}  # fmt: skip
