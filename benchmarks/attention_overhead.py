"""``sp-bench attention --vs-single``: what the SP runtime costs on top of its kernel.

- World 1: ``sp.attention`` forward + backward on one packed sequence (one document of T tokens, 8 heads x
  64, CPU fused kernel) against one call of the same fused op (``aten::_scaled_dot_product_flash_attention_for_cpu``
  and its backward, through autograd; GQA kv heads repeated for it, as the op needs) on the same tensors.
  Causal and full, 2K-16K tokens, GQA (8 q / 2 kv heads) and not, fp32 and bf16. The two are interleaved in
  one run: a warm-up of each, then ``reps`` alternating timings; the ratio is median(ours) / median(single).
  One rank uses 2 threads (this machine's cores).
- World 4 (gloo ranks, one thread each): ulysses 4, ring 4 and hybrid 2x2 on one causal document of 8K / 16K
  tokens: the time per call (the slowest rank, median of ``reps`` after a warm-up) and the share of it spent waiting on
  communication (the runtime's own ``comm_wait`` spans, :mod:`sp.timing`: time inside the ring exchanges' and
  the all-to-alls' ``wait``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

HEADS, HEAD_DIM = 8, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(t: int, kv: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(t, h, HEAD_DIM, generator=g).to(dtype) for h in (HEADS, kv, kv, HEADS))
    return q, k, v, dout


def _ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, ctx: Any) -> Any:
    import sp

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

    def call() -> None:
        q.grad = k.grad = v.grad = None
        sp.attention(q, k, v, ctx).backward(dout)

    return call


def _single(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, causal: bool) -> Any:
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    g = HEADS // k.shape[1]
    # [T, h, d] -permute-> [1, h, T, d]: the op's layout, made once outside the timing
    qs, ks, vs, ds = (x.permute(1, 0, 2).unsqueeze(0).contiguous() for x in (q, k, v, dout))
    qs, ks, vs = (x.requires_grad_() for x in (qs, ks, vs))

    def call() -> None:
        qs.grad = ks.grad = vs.grad = None
        kr, vr = (x.repeat_interleave(g, dim=1) if g > 1 else x for x in (ks, vs))  # [1, h, T, d]
        out = op(qs, kr, vr, 0.0, causal, scale=HEAD_DIM**-0.5)[0]
        out.backward(ds)

    return call


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _world1_rank(rank: int, world: int, tokens: list[int], reps: int) -> list[dict]:
    import sp

    torch.set_num_threads(2)  # one rank: both cores of this machine, for both sides
    pool = sp.GroupPool()
    rows = []
    for t in tokens:
        for causal in (True, False):
            for kv in (HEADS, 2):
                for name, dtype in DTYPES.items():
                    q, k, v, dout = _inputs(t, kv, dtype)
                    ctx = pool.context((0,), 1, 1, [0, t], causal=causal, kernel="cpu_fused")
                    ours, single = _ours(q, k, v, dout, ctx), _single(q, k, v, dout, causal)
                    ours()
                    single()  # warm-up
                    a, b = [], []
                    for _ in range(reps):  # interleaved
                        a.append(_timed(ours))
                        b.append(_timed(single))
                    ma, mb = statistics.median(a), statistics.median(b)
                    rows.append({"bench": "attention_vs_single", "world": 1, "tokens": t, "causal": causal,
                                 "kv_heads": kv, "heads": HEADS, "dtype": name, "reps": reps,
                                 "sp_attention_ms": round(1e3 * ma, 2), "single_call_ms": round(1e3 * mb, 2),
                                 "ratio": round(ma / mb, 3)})  # fmt: skip
    return rows


def _world4_rank(rank: int, world: int, tokens: list[int], reps: int) -> list[dict]:
    import torch.distributed as dist

    import sp
    from sp.timing import COMM_WAIT, SpanTimer

    pool = sp.GroupPool()
    rows = []
    for t in tokens:
        for name, (u, r) in (("ulysses", (4, 1)), ("ring", (1, 4)), ("hybrid", (2, 2))):
            timer = SpanTimer(torch.device("cpu"))  # the runtime's own comm_wait spans (sp.timing)
            ctx = pool.context(tuple(range(world)), u, r, [0, t], causal=True, kernel="cpu_fused", timer=timer)
            full = _inputs(t, HEADS, torch.float32)
            q, k, v, dout = (sp.shard(x, ctx.layout, ctx.rank) for x in full)
            call = _ours(q, k, v, dout, ctx)
            dist.barrier()
            call()  # warm-up
            times, waited = [], []
            for _ in range(reps):
                dist.barrier()
                before = timer.totals().get(COMM_WAIT, 0.0)
                times.append(_timed(call))
                waited.append(timer.totals().get(COMM_WAIT, 0.0) - before)
            rows.append({"strategy": name, "u": u, "r": r, "tokens": t, "times": times, "waited": waited})
    return rows


def world4(tokens: list[int], reps: int) -> list[dict]:
    from sp.spawn import run_distributed

    per_rank = run_distributed(_world4_rank, 4, tokens, reps, timeout=3600)
    rows = []
    for i, row in enumerate(per_rank[0]):
        slowest = [max(pr[i]["times"][j] for pr in per_rank) for j in range(reps)]
        share = [statistics.median(pr[i]["waited"][j] / pr[i]["times"][j] for j in range(reps)) for pr in per_rank]
        rows.append({"bench": "attention_world4", "world": 4, "strategy": row["strategy"], "u": row["u"],
                     "r": row["r"], "tokens": row["tokens"], "causal": True, "heads": HEADS, "dtype": "fp32",
                     "reps": reps, "per_call_ms": round(1e3 * statistics.median(slowest), 1),
                     "comm_wait_share_mean_over_ranks": round(sum(share) / len(share), 3),
                     "comm_wait_share_max_rank": round(max(share), 3)})  # fmt: skip
    return rows


def world1(tokens: list[int], reps: int) -> list[dict]:
    from sp.spawn import run_distributed

    out: list[dict] = run_distributed(_world1_rank, 1, tokens, reps, timeout=7200)[0]
    return out


def run(tokens1: list[int], tokens4: list[int], reps: int) -> list[dict]:
    return (world1(tokens1, reps) if tokens1 else []) + (world4(tokens4, reps) if tokens4 else [])
