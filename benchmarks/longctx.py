"""``sp-bench longctx``: one long document, one training step of the real trainer on CPU ranks.

The trainer (FSDP2, full activation checkpointing, fp32, adaptive planner) trains one step on a single
document of ``tokens`` tokens (real text: this Python's standard library sources, concatenated into one
JSONL document), with the saved-for-backward counter on. Reports the plan, the step time, and per rank the
largest bytes saved for backward against the planner's prediction for that plan, plus states and peak RSS.
"""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path


def write_document(path: Path, tokens: int) -> None:
    """One JSONL line whose byte-level text gives ``tokens`` training tokens (tokens + 1 bytes, ASCII)."""
    text, need = [], tokens + 1
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        chunk = f.read_text(encoding="utf-8", errors="ignore").encode("ascii", errors="ignore").decode()
        text.append(chunk[:need])
        need -= len(text[-1])
        if need <= 0:
            break
    path.write_text(json.dumps({"text": "".join(text)}) + "\n")


def _worker(rank: int, world: int, data: str, out: str, tokens: int, technique: str = "plain") -> dict:
    from dataclasses import replace

    from benchmarks.memory import TECHNIQUES
    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from trainer.config import DataConfig, TrainConfig
    from trainer.loop import Trainer, TrainJob

    job = TrainJob(
        model=ModelShape(name="tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
                         checkpointing="full", bytes_per_value=4),
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=world, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, intra_latency_us=200.0, inter_latency_us=200.0, beta_ms=5.0),
        planner=PlannerConfig(),
        data=DataConfig(source="jsonl", path=data, max_len=tokens, tokens_per_step=tokens),
        train=TrainConfig(steps=1, out_dir=out, progress=False, checkpoint_every=0, resume=False, picture_every=0,
                          memory_every=1, sharding="fsdp", precision="fp32", collective_timeout_s=3600.0),
    )  # fmt: skip
    states = technique.endswith("+states")  # the optimizer states in host memory (planner.state_offload=on)
    job = replace(job, model=replace(job.model, **TECHNIQUES[technique.removesuffix("+states")]),
                  planner=replace(job.planner, state_offload="on" if states else "off"))  # fmt: skip
    tr = Trainer(job)
    t0 = time.perf_counter()
    losses = tr.run()
    seconds = time.perf_counter() - t0
    if rank:
        return {}
    v = tr.last_values
    plan = tr.last_plan
    return {
        "case": f"longctx/{tokens}/P{world}/tiny/{job.model.checkpointing}/fsdp/fp32/{technique}",
        "tokens": tokens, "world": world, "loss": losses[0], "step_s": seconds,
        "plan": [[str(g.shape), g.first_rank, len(g.seqs)] for m in plan.micro_steps for g in m.groups],
        "act_bytes_measured_max": int(v["memory/saved_for_backward_gib_max"] * 2**30),
        "act_bytes_predicted_max": int(v["memory/saved_for_backward_predicted_gib_max"] * 2**30),
        "act_error": v["memory/saved_for_backward_gib_max"] / v["memory/saved_for_backward_predicted_gib_max"] - 1,
        "state_bytes_rank0": int(v["memory/states_gib"] * 2**30),
        "state_bytes_predicted_rank0": int(v["memory/states_predicted_gib"] * 2**30),
        "states_on_host": bool(v["memory/states_on_host"]),
        "peak_rss_gib_rank0": v["memory/peak_gib"],
        "offloaded_bytes_max": int(v.get("memory/offloaded_gib_max", 0.0) * 2**30),
        "offloaded_bytes_predicted_max": int(v.get("memory/offloaded_predicted_gib_max", 0.0) * 2**30),
    }  # fmt: skip


def run(tokens: int, world: int, workdir: str, technique: str = "plain") -> dict:
    from sp.spawn import run_distributed

    Path(workdir).mkdir(parents=True, exist_ok=True)
    data = Path(workdir) / "long.jsonl"
    write_document(data, tokens)
    return run_distributed(_worker, world, str(data), str(Path(workdir) / "run"), tokens, technique, timeout=7200)[0]
