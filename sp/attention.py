"""Public entry point: exact SP attention on a packed local shard, forward and backward.

``attention(q, k, v, ctx)`` takes this rank's local tokens in packed ``[tokens, heads, head_dim]`` layout
(as produced by :func:`sp.layout.shard` with ``ctx.layout``) and returns this rank's attention output in the
same layout. One code path serves all strategies:

- Ulysses (u = P, r = 1): all-to-all to head-sharded full sequences, local attention, all-to-all back;
- ring (u = 1, r = P): zigzag ring attention (:mod:`sp.ring`);
- hybrid (u x r): all-to-all inside the u-sub-group, ring across the r sub-groups (USP's 2D scheme).

With u > 1 the heads go in ``ctx.head_chunks`` chunks: the all-to-alls of chunk c+1 are posted before
chunk c is attended, and chunk c's result is sent back while chunk c+1 computes; one chunk's buffers are in
flight each way, so the all-to-all working set is ``2 (A + B)`` per chunk (A: its q, k, v heads, B: its output
heads; ``CostModel.working_bytes_per_token``), counted by ``ctx.comm_buffers`` when set.
"""

from __future__ import annotations

from typing import Any

import torch

from sp.context import SPContext
from sp.kernels import get_kernel
from sp.ring import ring_backward, ring_forward
from sp.timing import timing, waiting
from sp.ulysses import HeadPlan, Posted, place_heads, post_head_to_seq, post_seq_to_head, take, to_ring_local


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: SPContext) -> HeadPlan:
    n = ctx.layout.local_tokens
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if t.shape[0] != n:
            raise ValueError(
                f"{name} has {t.shape[0]} local tokens but the context's cu_seqlens give {n} on each rank "
                f"(lengths {ctx.layout.seqlens[:8]}, u={ctx.u}, r={ctx.r}); shard with sp.shard(x, ctx.layout, rank)"
            )
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, with q's head_dim {q.shape[2]}")
    return HeadPlan.build(q.shape[1], k.shape[1], ctx.u, ctx.head_chunks)


class _SPAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: SPContext) -> torch.Tensor:
        with timing(ctx.timer):
            return _SPAttention._forward(fctx, q, k, v, ctx)

    @staticmethod
    def backward(fctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        with timing(fctx.sp[0].timer):
            return _SPAttention._backward(fctx, dout)

    @staticmethod
    def _forward(fctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: SPContext) -> torch.Tensor:
        plan = _check(q, k, v, ctx)
        kernel = ctx.tables.memo("kernel", lambda: get_kernel(ctx.kernel))  # one per micro-step
        scale = ctx.scale_for(q.shape[2])
        k, v = plan.expand_kv(k), plan.expand_kv(v)
        saved: list[tuple[torch.Tensor, ...]] = []
        if ctx.u == 1:
            out, lse = ring_forward(q, k, v, ctx, kernel, scale)
            saved.append((q, k, v, out, lse))
        else:  # one chunk in flight each way: chunk c+1's all-to-all and chunk c-1's return run under chunk c
            out = torch.empty_like(q)
            perm, g, n, meter = ctx.gather_perm, ctx.ulysses_group, plan.chunks, ctx.comm_buffers
            pending = [post_seq_to_head(x, ctx.u, n, 0, g, meter) for x in (q, k, v)]
            back: Posted | None = None
            for c in range(n):
                qc, kc, vc = (to_ring_local(_take(ctx, p), perm) for p in pending)
                if c + 1 < n:
                    pending = [post_seq_to_head(x, ctx.u, n, c + 1, g, meter) for x in (q, k, v)]
                oc, lc = ring_forward(qc, kc, vc, ctx, kernel, scale)
                if back is not None:
                    place_heads(_take(ctx, back), out, n, c - 1)
                back = post_head_to_seq(oc, ctx.u, perm, g, meter)
                saved.append((qc, kc, vc, oc, lc))
            assert back is not None  # n >= 1 chunks
            place_heads(_take(ctx, back), out, n, n - 1)
        # save_for_backward (not ctx attributes): activation checkpointing can then drop and recompute them,
        # and saved-tensor hooks (memory accounting, offloading) see them
        fctx.save_for_backward(*(x.detach() for s in saved for x in s))
        fctx.sp = (ctx, plan, kernel, scale)
        return out

    @staticmethod
    def _backward(fctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        ctx, plan, kernel, scale = fctx.sp
        flat = fctx.saved_tensors
        saved = [flat[i : i + 5] for i in range(0, len(flat), 5)]  # (q, k, v, out, lse) per head chunk
        dout = dout.contiguous()
        if ctx.u == 1:
            q, k, v, out, lse = saved[0]
            dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx, kernel, scale)
        else:
            perm, g, n, u = ctx.gather_perm, ctx.ulysses_group, plan.chunks, ctx.u
            t = dout.shape[0]
            dq = dout.new_empty(t, plan.heads, dout.shape[2])
            dk = dout.new_empty(t, plan.kv_local * u, dout.shape[2])
            dv = torch.empty_like(dk)
            meter = ctx.comm_buffers
            pending = post_seq_to_head(dout, u, n, 0, g, meter)
            backs: list[Any] = []
            for c in range(n):
                doc = to_ring_local(_take(ctx, pending), perm)
                if c + 1 < n:
                    pending = post_seq_to_head(dout, u, n, c + 1, g, meter)
                qc, kc, vc, oc, lc = saved[c]
                grads = ring_backward(doc, qc, kc, vc, oc, lc, ctx, kernel, scale)
                if backs:
                    for b, full in zip(backs, (dq, dk, dv)):
                        place_heads(_take(ctx, b), full, n, c - 1)
                backs = [post_head_to_seq(x, u, perm, g, meter) for x in grads]
            for b, full in zip(backs, (dq, dk, dv)):
                place_heads(_take(ctx, b), full, n, n - 1)
        return dq, plan.reduce_kv_grad(dk), plan.reduce_kv_grad(dv), None


def _take(ctx: SPContext, posted: Posted) -> torch.Tensor:
    with waiting(ctx.timer):
        posted[0].wait()  # type: ignore[attr-defined]
    return take(posted, ctx.comm_buffers)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: SPContext) -> torch.Tensor:
    """Exact (causal or full) attention of this rank's packed shard; differentiable in q, k and v."""
    if ctx.kernel == "ring_flash":
        from sp.ring_flash import ring_flash_attention

        _check(q, k, v, ctx)
        return ring_flash_attention(q, k, v, ctx)
    out: torch.Tensor = _SPAttention.apply(q, k, v, ctx)
    return out
