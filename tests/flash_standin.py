"""A CPU stand-in for ``flash_attn.flash_attn_interface.flash_attn_func`` with flash-attn 2.x's conventions:
q ``[b, sq, h, d]``, k/v ``[b, sk, hk, d]`` (GQA), causal mask aligned bottom-right (row i sees key
j <= i + sk - sq), returns ``(out, softmax_lse [b, h, sq], None)`` with ``return_attn_probs``, and a row that
sees no key gets out 0 and lse +inf. Plain softmax in float64 for float64 input, float32 otherwise."""

from __future__ import annotations

import torch


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False, **_):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(cd).repeat_interleave(h // hk, dim=2)  # [b, sk, h, d]
    vf = v.to(cd).repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(cd), kf) * scale
    if causal:
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)  # [b, h, sq, 1]
    out = torch.einsum("bhqk,bkhd->bqhd", p / torch.where(den > 0, den, 1.0), vf).to(q.dtype)
    lse = torch.where(den > 0, m + torch.log(den), float("inf")).squeeze(-1)  # [b, h, sq]
    return (out, lse, None) if return_attn_probs else out


def register() -> None:
    """Make kernel name ``flash_cpu`` = the real FlashKernel code path driving this stand-in (any dtype)."""
    from functools import partial

    from sp.kernels import KERNELS, FlashKernel

    KERNELS["flash_cpu"] = partial(FlashKernel, impl=flash_attn_func, half_only=False)
