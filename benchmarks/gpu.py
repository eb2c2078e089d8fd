"""``sp-bench gpu``: the one-GPU check of the CUDA path (`make gpu-check`; needs only torch's CUDA build, under
10 minutes on one H100). Every row is printed as one JSON line as soon as it is measured and appended to
``--out``/gpu.jsonl; a table of all rows closes the run.

1. Kernels: every fused kernel this machine has (torch's flash op, torch's cuDNN op; the flash-attn package
   when it loads; ``--kernels`` names others, e.g. torch_fa3) through ``sp.attention`` at 4K-128K tokens of
   four causal GQA sequences (varlen), in bf16 against the float64 reference (forward and backward), and
   its forward and backward TFLOP/s at llama3's head shape (32 query heads, 8 kv heads, head dim 128; the
   standard count: forward 4 c L^2 H d with c = 1/2, backward twice that). The block-level checks of one
   pair (offsets, rows that see no key) follow for each.
2. Training: the real trainer on a one-rank NCCL world (FSDP2, bf16) of a llama3-shaped model with two layers,
   two steps per memory technique (none, full checkpointing, offload, chunked loss, tiled MLP): bytes saved
   for backward, states and peak memory against the planner's prediction, step time against the plan's.
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
    """A block kernel (``flash``: default flash-attn's) against the float64 reference in bf16: single pairs
    (forward, fused backward from the final out/lse) and one batched varlen ring step. ``shrink`` divides
    every length (the CPU tests run this with stand-ins at a smaller size)."""
    import torch

    from sp.kernels import FlashKernel, TorchKernel, backward_pairs, forward_pairs

    g = torch.Generator(device=device).manual_seed(0)
    h, hk = heads
    scale = dim**-0.5
    flash, ref = flash or FlashKernel(), TorchKernel()
    name = getattr(flash, "name", "flash")
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
            "case": f"{name}_block/{nq}x{nk}/q{q_pos}k{k_pos}/{'causal' if mask else 'full'}", "kernel": name,
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
    out_rows.append({"case": f"{name}_varlen_step", "kernel": name, "out_rel_err": _rel(got[0], out),
                     **lse_errors(got[1], lse),
                     **{f"d{n}_rel_err": _rel(a, b) for n, a, b in zip("qkv", grads, r_grads)}})  # fmt: skip
    return out_rows


LENGTHS = (4096, 16384, 65536, 131072)
LLAMA3 = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "ffn": 14336, "vocab": 128256,
          "theta": 500000.0}  # fmt: skip
TECHNIQUES = {"none": {"checkpointing": "none"}, "full": {"checkpointing": "full"},
              "offload": {"checkpointing": "offload"},
              "loss_chunk": {"checkpointing": "full", "loss_chunk_tokens": 4096},
              "tiling": {"checkpointing": "full", "tile_tokens": 4096}}  # fmt: skip


def split(tokens: int) -> list[int]:
    """Four sequences of a varlen batch: 1/2, 1/4, 1/8 and the rest (odd lengths: no block multiple)."""
    a, b, c = tokens // 2 - 1, tokens // 4 + 3, tokens // 8 - 5
    return [a, b, c, tokens - a - b - c]


def causal_flops(lengths: list[int], heads: int, dim: int) -> float:
    """Standard forward attention FLOPs of causal sequences: 4 c L^2 H d with c = 1/2 (backward: twice)."""
    return sum(4 * 0.5 * n * n * heads * dim for n in lengths)


def _timed(fn: Any, device: Any, repeats: int = 3) -> float:
    import time

    import torch

    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_sweep(name: str, lengths: tuple[int, ...] = LENGTHS, device: str = "cuda",
                 heads: tuple[int, int] = (32, 8), dim: int = 128, exact_heads: tuple[int, int] = (4, 1),
                 dtype: Any = None, repeats: int = 3) -> Iterator[dict]:  # fmt: skip
    """Kernel ``name`` through ``sp.attention`` on one rank: per length, the relative errors of out, dq, dk and
    dv against the float64 reference (``exact_heads``: few heads keep the reference's score tiles small) and
    the forward / backward TFLOP/s at ``heads`` x ``dim``."""
    import torch

    from trainer.kernel_choice import exactness

    dev, dt = torch.device(device), dtype or torch.bfloat16
    for tokens in lengths:
        lens = split(tokens)
        errs = exactness(name, dev, dt, *exact_heads, dim, tuple(lens))
        fwd, both = _speed(name, lens, heads, dim, dev, dt, repeats)
        flops = causal_flops(lens, heads[0], dim)
        yield {"case": f"kernel/{name}/{tokens // 1024}K", "kernel": name, "tokens": tokens, "sequences": lens,
               **errs, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "fwd_tflops": flops / fwd / 1e12,
               "bwd_tflops": 2 * flops / max(both - fwd, 1e-9) / 1e12}  # fmt: skip


def _cu(lens: list[int]) -> list[int]:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


def _speed(name: str, lens: list[int], heads: tuple[int, int], dim: int, dev: Any, dt: Any,
           repeats: int) -> tuple[float, float]:  # fmt: skip
    """Best seconds of a forward (no grad) and of a forward + backward of ``name`` on the varlen batch."""
    import torch

    import sp

    cu = _cu(lens)
    ctx = sp.SPContext(sp.GroupLayout.build(cu), 0, kernel=name, device=str(dev))
    q, k, v = (
        torch.randn(cu[-1], n, dim, device=dev, dtype=dt, requires_grad=True) for n in (heads[0], *heads[1:] * 2)
    )
    with torch.no_grad():
        fwd = _timed(lambda: sp.attention(q, k, v, ctx), dev, repeats)
    both = _timed(lambda: sp.attention(q, k, v, ctx).backward(torch.ones_like(q)), dev, repeats)
    return fwd, both


def write_kernel_calibration(rows: list[dict], hardware: dict, path: Path) -> None:
    """The measured speeds at the longest length each kernel ran, as a kernel calibration file:
    ``sp-plan cluster.calibration=PATH`` (and a run's online fit, which starts from it) assume them."""
    import json

    from planner.calibration import kernel_file

    longest: dict[str, dict] = {}
    for r in rows:
        if r["case"].startswith("kernel/") and r["tokens"] >= longest.get(r["kernel"], {}).get("tokens", 0):
            longest[r["kernel"]] = r
    rates = {k: {"fwd": r["fwd_tflops"], "bwd": r["bwd_tflops"]} for k, r in longest.items()}
    path.write_text(json.dumps(kernel_file(rates, hardware), indent=1))
    print(f"[sp-bench gpu] attention speeds written to {path} (sp-plan cluster.calibration={path})", flush=True)


def installed(names: list[str] | None = None) -> dict[str, str | None]:
    """Fused CUDA kernels and why each is not usable here (None: usable): a tiny bf16 call must run."""
    import torch

    import sp
    from sp.kernels import flash_attn_status

    out: dict[str, str | None] = {}
    for name in names or ["torch_flash", "cudnn", "flash"]:
        if name == "flash" and flash_attn_status() is not None:
            out[name] = flash_attn_status()
            continue
        try:
            x = torch.randn(64, 2, 64, device="cuda", dtype=torch.bfloat16)
            sp.attention(x, x, x, sp.SPContext(sp.GroupLayout.build([0, 40, 64]), 0, kernel=name, device="cuda"))
            out[name] = None
        except (ValueError, RuntimeError, NotImplementedError) as e:
            out[name] = str(e).splitlines()[0][:200]
    return out


def training(tokens_list: list[int], steps: int, techniques: tuple[str, ...] = tuple(TECHNIQUES),
             layers: int = 2) -> Iterator[dict]:  # fmt: skip
    """One row per (technique, document length), yielded as it finishes: the real trainer on one GPU (FSDP2,
    bf16) with a llama3-shaped model of ``layers`` layers."""
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
        for technique in techniques:
            for tokens in tokens_list:
                data = work / f"doc{tokens}.jsonl"
                if not data.exists():
                    write_document(data, tokens)
                shape = ModelShape(name=f"llama3-{layers}l", layers=layers, bytes_per_value=2, **LLAMA3,
                                   **TECHNIQUES[technique])  # type: ignore[arg-type]  # fmt: skip
                job = TrainJob(
                    model=shape,
                    cluster=Cluster(name="one-gpu", nodes=1, gpus_per_node=1, peak_tflops=989.0, mfu=0.4,
                                    memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 * 0.9),
                    planner=PlannerConfig(checkpointing=(), loss_chunk_tokens=(), tile_tokens=()),
                    data=DataConfig(source="jsonl", path=str(data), max_len=tokens, tokens_per_step=tokens),
                    train=TrainConfig(steps=steps, out_dir=str(work / f"run-{technique}-{tokens}"), progress=False,
                                      checkpoint_every=0, resume=False, picture_every=0, memory_every=1,
                                      sharding="fsdp", precision="bf16"),
                )  # fmt: skip
                gc.collect()  # earlier rows' models live on in reference cycles and would inflate this row's peak
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                tr = Trainer(job)
                losses = tr.run()
                times = tr.step_times
                v = tr.last_values
                plan = tr.last_plan
                yield {
                    "case": f"train/{shape.name}/{technique}/{tokens // 1024}K", "technique": technique,
                    "tokens": tokens, "kernel": tr.kernel.name, "step_s": times,
                    "step_predicted_s": plan.time_s if plan is not None else None,
                    "tokens_per_s": tokens / min(times[1:] or times),
                    "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "peak_predicted_gib": tr.cost.memory_gib(tokens, 1),
                    "act_bytes_measured": int(v["memory/saved_for_backward_gib_max"] * 2**30),
                    "act_bytes_predicted": int(v["memory/saved_for_backward_predicted_gib_max"] * 2**30),
                    "state_bytes": int(v["memory/states_gib"] * 2**30),
                    "state_bytes_predicted": int(v["memory/states_predicted_gib"] * 2**30),
                    "loss": losses[-1], "attention_s": v.get("time/attention_s"),
                }  # fmt: skip
                del tr
    finally:
        dist.destroy_process_group()


COLUMNS = [("case", "{}"), ("out_rel_err", "{:.1e}"), ("dq_rel_err", "{:.1e}"), ("fwd_tflops", "{:.0f}"),
           ("bwd_tflops", "{:.0f}"), ("step_s", "{}"), ("step_predicted_s", "{:.3f}"),
           ("act_bytes_measured", "{:.3e}"), ("act_bytes_predicted", "{:.3e}"), ("peak_allocated_gib", "{:.1f}"),
           ("peak_predicted_gib", "{:.1f}")]  # fmt: skip


def table(rows: list[dict]) -> str:
    """One plain-text table of every row (blank where a row has no such column)."""

    def cell(row: dict, key: str, fmt: str) -> str:
        v = row.get(key)
        if v is None:
            return ""
        if isinstance(v, list):
            return "/".join(f"{x:.3f}" for x in v)
        return fmt.format(v)

    cells = [[k for k, _ in COLUMNS]] + [[cell(r, k, f) for k, f in COLUMNS] for r in rows]
    width = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c[i].ljust(width[i]) for i in range(len(COLUMNS))) for c in cells)


def run(tokens: list[int], steps: int, out: str = "runs/gpu-check", kernels: list[str] | None = None,
        lengths: tuple[int, ...] = LENGTHS) -> Iterator[dict]:  # fmt: skip
    """Every row, yielded as soon as it is measured (a crash in a later row keeps the earlier ones), each also
    appended to ``out``/gpu.jsonl; the table is printed at the end."""
    import json

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("sp-bench gpu needs a CUDA GPU and torch's CUDA build (see docs: 'GPU install')")
    os.environ.setdefault("LOCAL_RANK", "0")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def emit(row: dict) -> dict:
        rows.append(row)
        with open(path / "gpu.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    status = installed(kernels)
    hardware = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    yield emit({"case": "installed", **hardware, "kernels": status})
    for name, problem in status.items():
        if problem is None:
            for row in kernel_sweep(name, lengths):
                yield emit(row)
    if any(r.get("kernel") and r["case"].startswith("kernel/") for r in rows):
        write_kernel_calibration(rows, hardware, path / "kernels.json")
    for row in training(tokens, steps):
        yield emit(row)
    print(table(rows), flush=True)
    print(f"[sp-bench gpu] {len(rows)} rows in {path / 'gpu.jsonl'}", flush=True)
