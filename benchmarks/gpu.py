"""``sp-bench gpu``: the one-GPU check of the CUDA path (needs CUDA and flash-attn; under 10 minutes).

1. Kernels: the flash block kernel (forward, and the fused backward from the final out/lse) and the batched
   varlen ring-step path against the float64 reference, in bf16: causal pairs at several offsets, GQA.
2. Training: the real trainer on a one-rank NCCL world (FSDP2 + bf16 + full checkpointing, adaptive plan of
   one group) on one document of 16K, 64K and 128K tokens of a mid-size GPT: tokens/s (steps after the first),
   peak allocated memory, bytes saved for backward vs the planner's prediction, states vs prediction.
One JSON object per line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

MID = {"name": "gpu-mid", "layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 4, "ffn": 2816, "vocab": 32000}


def _rel(x: Any, ref: Any) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def kernel_checks() -> list[dict]:
    import torch

    from sp.kernels import FlashKernel, TorchKernel, backward_pairs, forward_pairs

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    flash, ref = FlashKernel(), TorchKernel()
    for nq, nk, q_pos, k_pos, mask in [(1024, 1024, 0, 0, True), (512, 1536, 1024, 0, True), (700, 300, 0, 200, True),
                                       (512, 512, 2048, 0, False)]:  # fmt: skip
        q, k, v, do = (torch.randn(n, h, 128, device="cuda", generator=g).bfloat16()
                       for n, h in ((nq, 32), (nk, 8), (nk, 8), (nq, 32)))  # fmt: skip
        out, lse = flash.forward(q, k, v, q_pos, k_pos, mask, 128**-0.5)
        r_out, r_lse = ref.forward(q.double(), k.double(), v.double(), q_pos, k_pos, mask, 128**-0.5)
        grads = flash.backward(do, q, k, v, r_out.bfloat16(), r_lse.float(), q_pos, k_pos, mask, 128**-0.5)
        r_grads = ref.backward(do.double(), q.double(), k.double(), v.double(), r_out, r_lse, q_pos, k_pos, mask,
                               128**-0.5)  # fmt: skip
        rows.append({
            "case": f"flash_block/{nq}x{nk}/q{q_pos}k{k_pos}/{'causal' if mask else 'full'}",
            "out_rel_err": _rel(out, r_out), "lse_max_abs_err": float((lse.double() - r_lse).abs().max()),
            **{f"d{n}_rel_err": _rel(a, b) for n, a, b in zip("qkv", grads, r_grads)},
            "one_bf16_rounding": _rel(r_out.bfloat16(), r_out),
        })  # fmt: skip
    q, k, v, do = (torch.randn(4096, h, 128, device="cuda", generator=g).bfloat16() for h in (32, 8, 8, 32))
    pairs = [(0, 1024, 0, 1024, 0, 0, True), (1024, 1024, 0, 2048, 3072, 0, False), (2048, 2048, 2048, 2048, 0, 0,
             True), (0, 512, 3072, 512, 512, 0, True)]  # fmt: skip
    got = forward_pairs(flash, q, k, v, pairs, 128**-0.5)
    want = forward_pairs(ref, q.double(), k.double(), v.double(), pairs, 128**-0.5)
    err = max(_rel(a[1], b[1]) for a, b in zip(got, want))
    grads = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
    r_grads = [torch.zeros(x.shape, device="cuda", dtype=torch.float64) for x in (q, k, v)]
    out = torch.zeros(q.shape, device="cuda", dtype=torch.float64)
    lse = torch.full((32, 4096), float("-inf"), device="cuda", dtype=torch.float64)
    from sp.merge import merge_into

    for rows_, o, l_ in want:
        merge_into(out[rows_], lse[:, rows_], o, l_)
    backward_pairs(flash, do, q, k, v, out.bfloat16(), lse.float(), pairs, 128**-0.5, *grads)
    backward_pairs(ref, do.double(), q.double(), k.double(), v.double(), out, lse, pairs, 128**-0.5, *r_grads)
    rows.append({"case": "flash_varlen_step", "out_rel_err": err,
                 **{f"d{n}_rel_err": _rel(a, b) for n, a, b in zip("qkv", grads, r_grads)}})  # fmt: skip
    return rows


def training(tokens_list: list[int], steps: int) -> list[dict]:
    import torch
    import torch.distributed as dist

    from benchmarks.longctx import write_document
    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from trainer.config import DataConfig, TrainConfig
    from trainer.loop import Trainer, TrainJob

    work = Path(tempfile.mkdtemp(prefix="sp-bench-gpu-"))
    dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.FileStore(str(work / "store"), 1), rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))  # fmt: skip
    rows = []
    try:
        for tokens in tokens_list:
            data = work / f"doc{tokens}.jsonl"
            write_document(data, tokens)
            job = TrainJob(
                model=ModelShape(**MID, checkpointing="full", bytes_per_value=2),  # type: ignore[arg-type]
                cluster=Cluster(name="one-gpu", nodes=1, gpus_per_node=1, peak_tflops=989.0, mfu=0.4,
                                memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 * 0.9),
                planner=PlannerConfig(),
                data=DataConfig(source="jsonl", path=str(data), max_len=tokens, tokens_per_step=tokens),
                train=TrainConfig(steps=steps, out_dir=str(work / f"run{tokens}"), progress=False,
                                  checkpoint_every=0, resume=False, picture_every=0, memory_every=1,
                                  sharding="fsdp", precision="bf16"),
            )  # fmt: skip
            torch.cuda.reset_peak_memory_stats()
            tr = Trainer(job)
            losses = tr.run()
            times = tr.step_times  # device-synchronised per step
            v = tr.last_values
            rows.append({
                "case": f"train/{MID['name']}/{tokens // 1024}K/fsdp/bf16/full", "tokens": tokens,
                "step_s": times, "tokens_per_s": tokens / min(times[1:] or times),
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "act_bytes_measured": int(v["memory/saved_for_backward_gib_max"] * 2**30),
                "act_bytes_predicted": int(v["memory/saved_for_backward_predicted_gib_max"] * 2**30),
                "act_bytes_measured_per_token": v["memory/saved_for_backward_gib_max"] * 2**30 / tokens,
                "state_bytes": int(v["memory/states_gib"] * 2**30),
                "state_bytes_predicted": int(v["memory/states_predicted_gib"] * 2**30),
                "peak_predicted_gib": tr.cost.memory_gib(tokens, 1), "loss": losses[-1],
            })  # fmt: skip
            del tr
            torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    return rows


def run(tokens: list[int], steps: int) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("sp-bench gpu needs a CUDA GPU (and flash-attn: pip install '.[gpu]')")
    os.environ.setdefault("LOCAL_RANK", "0")
    return kernel_checks() + training(tokens, steps)
