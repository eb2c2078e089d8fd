"""``sp-bench gpu``: the one-GPU check of the CUDA path (needs CUDA and flash-attn; under 10 minutes).

1. Kernels: the flash block kernel (forward, and the fused backward from the final out/lse) and the batched
   varlen ring-step path against the float64 reference, in bf16: causal pairs at several offsets, GQA.
2. Training: the real trainer on a one-rank NCCL world (FSDP2 + bf16 + full checkpointing, adaptive plan of
   one group) on one document of 16K, 64K and 128K tokens of a mid-size GPT: tokens/s (steps after the first),
   peak allocated memory, bytes saved for backward vs the planner's prediction, states vs prediction.
One JSON object per line.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MID = {"name": "gpu-mid", "layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 4, "ffn": 2816, "vocab": 32000}


def _rel(x: Any, ref: Any) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def lse_errors(lse: Any, ref: Any) -> dict:
    """lse compared where the reference is finite (rows that see no key are -inf in both: their difference
    would be NaN), and the -inf pattern compared on its own."""
    import torch

    fin = torch.isfinite(ref)
    err = float((lse.double()[fin] - ref[fin]).abs().max()) if bool(fin.any()) else 0.0
    return {"lse_max_abs_err": err, "lse_inf_rows_match": bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref)))}


def merged(results: list, rows: int, heads: int, dim: int, device: Any) -> tuple[Any, Any]:
    """(out, lse) of a ring step from per-call results (``forward_pairs`` returns one per kernel call: a
    flash kernel may split a pair in two), merged as the ring merges them, in float64."""
    import torch

    from sp.merge import merge_into

    out = torch.zeros(rows, heads, dim, dtype=torch.float64, device=device)
    lse = torch.full((heads, rows), float("-inf"), dtype=torch.float64, device=device)
    for r, o, l_ in results:
        merge_into(out[r], lse[:, r], o.double(), l_.double())
    return out, lse


# (q rows, k rows, q pos, k pos, causal): diagonal, offset causal, rows that see no key, full
BLOCK_CASES = [(1024, 1024, 0, 0, True), (512, 1536, 1024, 0, True), (700, 300, 0, 200, True),
               (512, 512, 2048, 0, False)]  # fmt: skip
STEP_PAIRS = [(0, 1024, 0, 1024, 0, 0, True), (1024, 1024, 0, 2048, 3072, 0, False), (2048, 2048, 2048, 2048, 0, 0,
              True), (0, 512, 3072, 512, 512, 0, True)]  # fmt: skip


def kernel_checks(device: str = "cuda", flash: Any = None, heads: tuple[int, int] = (32, 8), dim: int = 128,
                  rows: int = 4096, shrink: int = 1) -> list[dict]:  # fmt: skip
    """The flash kernel (``flash``: default the real one) against the float64 reference in bf16: single
    pairs (forward, fused backward from the final out/lse) and one batched varlen ring step. ``shrink``
    divides every length (the CPU test runs this with flash-attn stand-ins at a smaller size)."""
    import torch

    from sp.kernels import FlashKernel, TorchKernel, backward_pairs, forward_pairs

    g = torch.Generator(device=device).manual_seed(0)
    h, hk = heads
    scale = dim**-0.5
    flash, ref = flash or FlashKernel(), TorchKernel()
    out_rows = []
    for nq, nk, q_pos, k_pos, mask in [tuple(x // shrink for x in c[:4]) + (c[4],) for c in BLOCK_CASES]:
        q, k, v, do = (torch.randn(n, hh, dim, device=device, generator=g).bfloat16()
                       for n, hh in ((nq, h), (nk, hk), (nk, hk), (nq, h)))  # fmt: skip
        out, lse = flash.forward(q, k, v, q_pos, k_pos, mask, scale)
        r_out, r_lse = ref.forward(q.double(), k.double(), v.double(), q_pos, k_pos, mask, scale)
        grads = flash.backward(do, q, k, v, r_out.bfloat16(), r_lse.float(), q_pos, k_pos, mask, scale)
        r_grads = ref.backward(do.double(), q.double(), k.double(), v.double(), r_out, r_lse, q_pos, k_pos, mask,
                               scale)  # fmt: skip
        out_rows.append({
            "case": f"flash_block/{nq}x{nk}/q{q_pos}k{k_pos}/{'causal' if mask else 'full'}",
            "out_rel_err": _rel(out, r_out), **lse_errors(lse, r_lse),
            **{f"d{n}_rel_err": _rel(a, b) for n, a, b in zip("qkv", grads, r_grads)},
            "one_bf16_rounding": _rel(r_out.bfloat16(), r_out),
        })  # fmt: skip
    n = rows // shrink
    q, k, v, do = (torch.randn(n, hh, dim, device=device, generator=g).bfloat16() for hh in (h, hk, hk, h))
    pairs = [tuple(x // shrink for x in p[:6]) + (p[6],) for p in STEP_PAIRS]
    got = merged(forward_pairs(flash, q, k, v, pairs, scale), n, h, dim, device)
    out, lse = merged(forward_pairs(ref, q.double(), k.double(), v.double(), pairs, scale), n, h, dim, device)
    grads = [torch.zeros(x.shape, device=device) for x in (q, k, v)]
    r_grads = [torch.zeros(x.shape, device=device, dtype=torch.float64) for x in (q, k, v)]
    backward_pairs(flash, do, q, k, v, out.bfloat16(), lse.float(), pairs, scale, *grads)
    backward_pairs(ref, do.double(), q.double(), k.double(), v.double(), out, lse, pairs, scale, *r_grads)
    out_rows.append({"case": "flash_varlen_step", "out_rel_err": _rel(got[0], out), **lse_errors(got[1], lse),
                     **{f"d{n}_rel_err": _rel(a, b) for n, a, b in zip("qkv", grads, r_grads)}})  # fmt: skip
    return out_rows


def training(tokens_list: list[int], steps: int) -> Iterator[dict]:
    """One row per document length, yielded as it finishes."""
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
            gc.collect()  # earlier rows' models live on in reference cycles and would inflate this row's peak
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            tr = Trainer(job)
            losses = tr.run()
            times = tr.step_times  # device-synchronised per step
            v = tr.last_values
            yield {
                "case": f"train/{MID['name']}/{tokens // 1024}K/fsdp/bf16/full", "tokens": tokens,
                "step_s": times, "tokens_per_s": tokens / min(times[1:] or times),
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "act_bytes_measured": int(v["memory/saved_for_backward_gib_max"] * 2**30),
                "act_bytes_predicted": int(v["memory/saved_for_backward_predicted_gib_max"] * 2**30),
                "act_bytes_measured_per_token": v["memory/saved_for_backward_gib_max"] * 2**30 / tokens,
                "state_bytes": int(v["memory/states_gib"] * 2**30),
                "state_bytes_predicted": int(v["memory/states_predicted_gib"] * 2**30),
                "peak_predicted_gib": tr.cost.memory_gib(tokens, 1), "loss": losses[-1],
                "attention_s": v.get("time/attention_s"), "step_predicted_s": v.get("time/step_predicted_s"),
            }  # fmt: skip
            del tr
    finally:
        dist.destroy_process_group()


def run(tokens: list[int], steps: int) -> Iterator[dict]:
    """Every row, yielded as soon as it is measured (a crash in a later row keeps the earlier ones)."""
    import torch

    from sp.kernels import flash_attn_status

    if not torch.cuda.is_available():
        raise SystemExit("sp-bench gpu needs a CUDA GPU (and flash-attn: see the README's 'GPU install')")
    problem = flash_attn_status()
    if problem:
        raise SystemExit(f"sp-bench gpu: {problem}")
    os.environ.setdefault("LOCAL_RANK", "0")
    yield from kernel_checks()
    yield from training(tokens, steps)
