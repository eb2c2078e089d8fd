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

    KERNELS["flash_cpu"] = partial(FlashKernel, **STANDINS, half_only=False)


@torch.library.custom_op("sp_standin::_flash_attn_backward", mutates_args=("dq", "dk", "dv"), device_types="cpu")
def _flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash-attn 2.8.3's private backward, wrapped as it wraps it (``torch.library.custom_op``: the object's
    signature is ``(*args, **kwargs)``, no parameter has a default but ``rng_state``): gradients of one call
    from the given (out, softmax_lse), written into dq/dk/dv (kv heads summed over their query-head group),
    bottom-right causal; returns softmax_d."""
    assert dq is not None and dk is not None and dv is not None
    _backward_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


def _backward_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf, vf = (x.to(cd).repeat_interleave(g, dim=2) for x in (k, v))  # [b, sk, h, d]
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(cd), kf) * softmax_scale
    if causal:
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    p = torch.exp(s - softmax_lse.to(cd)[..., None])  # [b, h, sq, sk]
    do = dout.to(cd)
    delta = (do * out.to(cd)).sum(-1).transpose(1, 2)[..., None]  # [b, h, sq, 1]
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vf)
    ds = p * (dp - delta) * softmax_scale
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", ds, kf))
    # [b, sk, h, d] -view-> [b, sk, hk, g, d] -sum-> [b, sk, hk, d]
    dk.copy_(torch.einsum("bhqk,bqhd->bkhd", ds, q.to(cd)).view(b, sk, hk, g, d).sum(3))
    dv.copy_(torch.einsum("bhqk,bqhd->bkhd", p, do).view(b, sk, hk, g, d).sum(3))


def _split(x, cu):
    cuts = cu.tolist()
    return [x[cuts[i] : cuts[i + 1]] for i in range(len(cuts) - 1)]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, return_attn_probs=False, **_):  # fmt: skip
    """flash-attn >= 2.5's varlen forward: packed ``[total, h, d]``, lse ``[h, total_q]``."""
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    outs, lses = [], []
    for qs, ks, vs in zip(_split(q, cu_seqlens_q), _split(k, cu_seqlens_k), _split(v, cu_seqlens_k)):
        assert qs.shape[0] <= max_seqlen_q and ks.shape[0] <= max_seqlen_k
        o, lse, _ = flash_attn_func(qs[None], ks[None], vs[None], 0.0, softmax_scale, causal, True)
        outs.append(o[0])
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse, None) if return_attn_probs else out


@torch.library.custom_op("sp_standin::_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv"), device_types="cpu")
def _flash_attn_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash-attn 2.8.3's varlen backward, custom-op wrapped like the real one (packed ``[total, h, d]``)."""
    assert dq is not None and dk is not None and dv is not None
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        a, b, c, e = cq[i], cq[i + 1], ck[i], ck[i + 1]
        _backward_into(dout[a:b][None], q[a:b][None], k[c:e][None], v[c:e][None], out[a:b][None],
                       softmax_lse[:, a:b][None], dq[a:b][None], dk[c:e][None], dv[c:e][None], softmax_scale,
                       causal)  # fmt: skip
    return torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)


STANDINS = {
    "impl": flash_attn_func,
    "backward_impl": _flash_attn_backward,
    "varlen_impl": flash_attn_varlen_func,
    "varlen_backward_impl": _flash_attn_varlen_backward,
}
