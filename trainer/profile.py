"""Measure compute and communication on the ranks at hand and write a cluster profile YAML.

Compute: dense matmul throughput (-> ``peak_tflops`` with ``mfu = 1``) and causal attention throughput of the
torch kernel. Communication: ``all_to_all_single`` and ring P2P bandwidth per group size (each size dividing
the world), and the latency of a tiny all-to-all. Runs on local gloo ranks through :mod:`sp.spawn`.
"""

from __future__ import annotations

import time

import torch

from planner.types import ModelShape


def best_time(fn, reps: int = 3, warmup: bool = True) -> float:
    """The fastest of ``reps`` timed calls (after one untimed call with ``warmup``)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(rank: int, world: int, mbytes: float) -> dict:
    """One rank's measurements (call on every rank of an initialised world; sp-bench e2e reuses it)."""
    import torch.distributed as dist

    from sp.comm import ring_exchange
    from sp.groups import GroupPool
    from sp.kernels import TorchKernel

    pool = GroupPool()
    out: dict = {}
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    out["matmul_tflops"] = 2 * n**3 / best_time(lambda: a @ b) / 1e12
    q = torch.randn(2048, 4, 64)
    t_attn = best_time(lambda: TorchKernel().forward(q, q, q, 0, 0, True, 0.125))
    out["attention_tflops"] = 2 * 2048**2 * 4 * 64 / t_attn / 1e12
    numel = int(mbytes * 2**20 / 4)
    a2a, p2p = {}, {}
    for size in (s for s in range(2, world + 1) if world % s == 0):
        pool.prepare([(tuple(range(b, b + size)), size) for b in range(0, world, size)])  # every rank, same order
        ranks = tuple(range((rank // size) * size, (rank // size) * size + size))
        g = pool.group(ranks)
        x = torch.randn(numel // size * size)
        y = torch.empty_like(x)
        dist.barrier()
        t = best_time(lambda g=g, x=x, y=y: dist.all_to_all_single(y, x, group=g))
        a2a[size] = x.numel() * 4 * (size - 1) / size / t / 1e9
        dist.barrier()
        t = best_time(lambda g=g, ranks=ranks, x=x: ring_exchange(x, ranks, ranks.index(rank), g).wait())
        p2p[size] = x.numel() * 4 / t / 1e9
    tiny = torch.zeros(world)
    dist.barrier()
    out["latency_us"] = 1e6 * best_time(lambda: dist.all_to_all_single(torch.empty_like(tiny), tiny), reps=20)
    out["a2a_gbs"], out["p2p_gbs"] = a2a, p2p
    return out


def _saved_per_token(rank: int, world: int, model: ModelShape, tokens: int, precision: str) -> float:
    """Bytes saved for backward per token by the trainer's model (one rank, one sequence of ``tokens``)."""
    import numpy as np
    from megatron.core import parallel_state

    from models.gpt import build_gpt
    from planner.types import Assignment, GroupShape
    from sp.groups import GroupPool
    from trainer.memory import SavedBytes
    from trainer.sharding import Regime, parallelize
    from trainer.step import group_pass

    parallel_state.initialize_model_parallel(1, 1)
    cpu = torch.device("cpu")
    net = parallelize(build_gpt(model, tokens), Regime("fsdp", precision, model.checkpointing), cpu)
    doc = [np.random.default_rng(0).integers(0, model.vocab, size=tokens + 1)]
    with SavedBytes(net) as meter:
        loss = group_pass(net, GroupPool(), Assignment(0, GroupShape(1, 1), (0,), 0.0, 0.0), doc, "torch", cpu)
    del loss
    return meter.bytes / tokens


def activation_bytes_per_token(model: ModelShape, tokens: int = 2048, precision: str = "fp32") -> float:
    """Measured saved-for-backward bytes per token plus the cost model's transient working set: the value
    ``cluster.act_bytes_per_token`` replaces in the planner."""
    from dataclasses import replace

    from planner.cost import CostModel
    from planner.types import Cluster
    from sp.spawn import run_distributed

    saved = run_distributed(_saved_per_token, 1, model, tokens, precision, timeout=600)[0]
    shape = replace(model, bytes_per_value=2 if precision == "bf16" else 4)
    cost = CostModel(Cluster(name="p", nodes=1, gpus_per_node=1), shape)
    us = shape.ulysses_degrees(64)
    return float(saved + max(cost.working_bytes_per_token(u, 2) for u in us))


def profile(world: int, mbytes: float = 16.0) -> dict:
    from sp.spawn import run_distributed

    res = run_distributed(measure, world, mbytes, timeout=600)
    sizes = res[0]["a2a_gbs"].keys()
    return {
        "name": "cpu",
        "nodes": 1,
        "gpus_per_node": world,
        "peak_tflops": min(r["matmul_tflops"] for r in res),
        "mfu": 1.0,
        "attention_tflops": min(r["attention_tflops"] for r in res),
        "a2a_gbs": {s: min(r["a2a_gbs"][s] for r in res) for s in sizes},
        "p2p_gbs": {s: min(r["p2p_gbs"][s] for r in res) for s in sizes},
        "intra_latency_us": max(r["latency_us"] for r in res),
        "inter_latency_us": max(r["latency_us"] for r in res),
    }
