"""``sp-bench capacity``: the longest single sequence the planner can place on N GPUs, per memory technique.

For each cluster size (8, 16, 32, 64 H100s of the ``h100x64`` profile: 8 per node, 76 GiB usable, 1.5 TiB
of host memory per node for offload) and each technique set, a bisection over the sequence length finds the
longest L for which the planner returns a plan (``Planner.plan([L])``: a sequence it cannot place is a
ValueError); tokens per GPU = L / N. Also the planned step time of a 1M-token sequence where it fits, the
plan's layout and its peak memory per GPU. Techniques: ``baseline`` (full checkpointing, today's),
``chunk`` (chunked loss, 2048-token chunks like ProLong's blocks), ``tile`` (tiled MLP, 8192-token tiles),
``offload`` (layer inputs in host memory), ``all``, and ``chosen`` (the planner picks checkpointing full or
offload, the loss chunk 0 or 2048 and the MLP tile 0 or 8192 per micro-step: each only where it pays).
One JSON object per (N, technique).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

TECHNIQUES = {
    "baseline": {},
    "chunk": {"loss_chunk_tokens": 2048},
    "tile": {"mlp_tile_tokens": 8192},
    "chunk+tile": {"loss_chunk_tokens": 2048, "mlp_tile_tokens": 8192},
    "offload": {"checkpointing": "offload"},
    "all": {"loss_chunk_tokens": 2048, "mlp_tile_tokens": 8192, "checkpointing": "offload"},
    "chosen": {},  # the planner picks per micro-step among CHOICE
}
CHOICE = {"checkpointing": ("full", "offload"), "loss_chunk_tokens": (0, 2048), "mlp_tile_tokens": (0, 8192)}


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


def _plan(planner, length: int):  # type: ignore[no-untyped-def]
    try:
        return planner.plan([length])
    except ValueError:
        return None


def longest(planner, hi: int) -> int:  # type: ignore[no-untyped-def]
    """The longest length (to 1%) the planner places."""
    lo = 1024
    if _plan(planner, lo) is None:
        return 0
    while _plan(planner, hi) is not None:
        lo, hi = hi, hi * 2
    while hi - lo > max(1024, lo // 100):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _plan(planner, mid) is not None else (lo, mid)
    return lo


def run(gpus: list[int], model_name: str = "llama3-8b") -> list[dict]:
    from planner.cost import CostModel
    from planner.planner import Planner, PlannerConfig
    from planner.report import _peak_breakdown
    from planner.types import ModelShape

    base = ModelShape(**config_fields("model", model_name))
    rows = []
    for n in gpus:
        for tech, kw in TECHNIQUES.items():
            cost = CostModel(_cluster(n), replace(base, **kw))
            choices = CHOICE if tech == "chosen" else {}
            planner = Planner(cost, PlannerConfig(use_milp=False, time_limit_s=1.0, **choices))  # type: ignore[arg-type]
            t0 = time.perf_counter()
            best = longest(planner, 131072)
            row = {
                "bench": "capacity",
                "model": model_name,
                "gpus": n,
                "technique": tech,
                "longest_tokens": best,
                "tokens_per_gpu": best // n,
                "search_s": round(time.perf_counter() - t0, 2),
            }
            plan = _plan(planner, 1 << 20)
            if plan is not None:
                micro, g = plan.peak_group()
                mem = _peak_breakdown(cost, [plan])
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
