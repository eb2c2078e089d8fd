"""``sp-bench capacity``: the longest single sequence the planner can place on N GPUs, per memory technique.

For each cluster size (8, 16, 32, 64 H100s of the ``h100x64`` profile: 8 per node, 76 GiB usable, 1.5 TiB
of host memory per node for offload) and each technique set, a bisection over the sequence length finds the
longest L for which the planner returns a plan (``Planner.plan([L])``: a sequence it cannot place is a
ValueError); tokens per GPU = L / N. Also the planned step time of a 1M-token sequence where it fits, the
plan's layout and its peak memory per GPU. Techniques: ``baseline`` (full checkpointing), ``chunk`` (chunked
loss, 2048-token chunks like ProLong's blocks), ``tile`` (sequence tiling: each layer but its attention core over
8192-token tiles), ``offload`` (layer inputs in host memory), ``all``, ``all+states`` (and the optimizer states in
host memory, ``planner.state_offload=on``), and ``chosen`` (the planner picks checkpointing full or offload, the
loss chunk 0 or 2048 and the tile 0 or 8192 per micro-step, each only where it pays, and the states' place per
run, ``planner.state_offload=auto``). ``bound``: what stops the longest sequence (GPU or host memory, and the
largest GPU item there). Every row has the RMSNorm of :mod:`models.rms_norm` (input + fp32 rstd saved).
One JSON object per (N, technique).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

TECHNIQUES = {
    "baseline": {},
    "chunk": {"loss_chunk_tokens": 2048},
    "tile": {"tile_tokens": 8192},
    "chunk+tile": {"loss_chunk_tokens": 2048, "tile_tokens": 8192},
    "offload": {"checkpointing": "offload"},
    "all": {"loss_chunk_tokens": 2048, "tile_tokens": 8192, "checkpointing": "offload"},
    "all+states": {"loss_chunk_tokens": 2048, "tile_tokens": 8192, "checkpointing": "offload"},
    "chosen": {},  # the planner picks per micro-step among CHOICE, and the states' place per run (auto)
}
STATES_ON_HOST = {"all+states"}  # planner.state_offload=on; "chosen" runs auto, the rest off
CHOICE = {"checkpointing": ("full", "offload"), "loss_chunk_tokens": (0, 2048), "tile_tokens": (0, 8192)}


def config_fields(group: str, name: str) -> dict:
    """A config file's fields (what sp-plan composes for ``group=name``), without Hydra."""
    import yaml

    from cli.hydra_app import CONFIG_DIR

    body = yaml.safe_load((Path(CONFIG_DIR) / group / f"{name}.yaml").read_text())
    body.pop("defaults", None)
    return body  # type: ignore[no-any-return]


def _cluster(gpus: int):  # type: ignore[no-untyped-def]
    """``h100x64``'s H100 profile on ``gpus`` GPUs (8 per node)."""
    from planner.types import Cluster

    return Cluster(**{**config_fields("cluster", "h100x64"), "name": f"h100x{gpus}", "nodes": max(1, gpus // 8),
                      "gpus_per_node": min(8, gpus)})  # fmt: skip


def _plan(planner_for, length: int):  # type: ignore[no-untyped-def]
    try:
        return planner_for(length).plan([length])
    except ValueError:
        return None


def longest(planner_for, hi: int) -> int:  # type: ignore[no-untyped-def]
    """The longest length (to 1%) the planner ``planner_for(length)`` places."""
    lo = 1024
    if _plan(planner_for, lo) is None:
        return 0
    while _plan(planner_for, hi) is not None:
        lo, hi = hi, hi * 2
    while hi - lo > max(1024, lo // 100):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _plan(planner_for, mid) is not None else (lo, mid)
    return lo


def bound(cost, length: int, n: int) -> str:  # type: ignore[no-untyped-def]
    """What stops a group of all ``n`` GPUs at ``length`` tokens: GPU memory or the node's host memory
    (offloaded layer inputs and states), and the largest GPU-memory item at that length."""
    from planner.capacity import world_shapes

    best = max(world_shapes(cost), key=lambda s: cost.tokens_capacity(n, s))
    free = (cost.cluster.memory_gib - cost.reserved_gib()) * 2**30 / cost.shape_bytes_per_token(best) * n
    parts = cost.memory_breakdown_gib(length / n, best)
    top = max((k for k in parts if k not in ("total", "host_offload_per_gpu", "host_states_per_gpu")),
              key=lambda k: parts[k])  # fmt: skip
    where = "gpu memory" if free <= cost.tokens_capacity(n, best) * 1.0001 else "host memory"
    return f"{where} (largest item: {top} {parts[top]:.1f} GiB at u{best.ulysses}r{best.ring})"


def run(gpus: list[int], model_name: str = "llama3-8b") -> list[dict]:
    from planner.cost import CostModel
    from planner.planner import Planner, PlannerConfig, memory_modes
    from planner.report import _peak_breakdown
    from planner.state_offload import resolve
    from planner.types import ModelShape

    base = ModelShape(**config_fields("model", model_name))
    rows = []
    for n in gpus:
        for tech, kw in TECHNIQUES.items():
            cost = CostModel(_cluster(n), replace(base, **kw), state_offload=tech in STATES_ON_HOST)
            choices = CHOICE if tech == "chosen" else {}
            config = PlannerConfig(use_milp=False, time_limit_s=1.0, **choices)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            modes = memory_modes(cost.model, config)
            fixed = Planner(cost, config)
            auto = tech == "chosen"  # the states go to the host only for lengths that need them

            def planner_for(length: int, cost=cost, config=config, modes=modes, fixed=fixed, auto=auto):  # type: ignore[no-untyped-def]
                return Planner(resolve(cost, "auto", length, modes), config) if auto else fixed

            best = longest(planner_for, 131072)
            planner = planner_for(best)
            row = {
                "bench": "capacity",
                "model": model_name,
                "gpus": n,
                "technique": tech,
                "longest_tokens": best,
                "tokens_per_gpu": best // n,
                "search_s": round(time.perf_counter() - t0, 2),
                "states": "host" if planner.cost.state_offload else "gpu",
                "bound": bound(planner.roomiest, best, n),
            }
            at_1m = planner_for(1 << 20)
            plan = _plan(planner_for, 1 << 20)
            if plan is not None:
                micro, g = plan.peak_group()
                mem = _peak_breakdown(at_1m.cost, [plan])
                row["mode_1m"] = micro.mode(cost.model).label
                row.update(
                    {
                        "step_s_1m": round(plan.time_s, 3),
                        "layout_1m": f"u{g.shape.ulysses}r{g.shape.ring}",
                        "peak_gib_1m": round(mem["total"], 1),
                        "memory_1m": {k: round(v, 2) for k, v in mem.items()},
                    }
                )
            rows.append(row)
    return rows
