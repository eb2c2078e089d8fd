"""Alternative ring backend on CUDA: ring-flash-attn's zigzag varlen ring on our layout.

Our ring-local layout for u == 1 is exactly ring-flash-attn's zigzag varlen one: every sequence's local rows
are [chunk i, chunk 2r-1-i], and each padded length is a multiple of 2r. Padding sits at sequence ends, so
under causal attention no real token sees it; non-causal input is refused (the library's zigzag ring
asserts causal). Needs CUDA, flash_attn (``make gpu-deps``) and ring_flash_attn (``pip install --no-deps
ring-flash-attn``); bf16/fp16 only (its fp32 backward is not exact).
"""

from __future__ import annotations

import torch

from sp.context import SPContext


def ring_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: SPContext) -> torch.Tensor:
    if ctx.u != 1 or ctx.r < 2:
        raise ValueError(f"kernel 'ring_flash' runs pure ring groups (u=1, r>=2), got u={ctx.u}, r={ctx.r}")
    if not ctx.causal:  # ring-flash-attn's zigzag ring asserts causal=True
        raise ValueError("kernel 'ring_flash' (ring-flash-attn's zigzag ring) is causal-only; use kernel='torch'")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"kernel 'ring_flash' takes bf16/fp16, got {q.dtype}; valid kernels for it: 'torch'")
    from ring_flash_attn import zigzag_ring_flash_attn_varlen_func

    cu = ctx.layout.local_cu_seqlens.to(device=q.device, dtype=torch.int32)
    out: torch.Tensor = zigzag_ring_flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        max(ctx.layout.local_seqlens),
        softmax_scale=ctx.scale_for(q.shape[2]),
        causal=ctx.causal,
        group=ctx.ring_group,
    )
    return out
