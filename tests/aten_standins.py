"""CPU stand-ins for torch's CUDA attention ops, registered as CPU kernels of the real aten operators.

``aten::_flash_attention_forward/_backward`` and ``aten::_cudnn_attention_forward/_backward`` have no CPU
kernel in torch 2.13; here each gets one (``torch.library.Library("aten", "IMPL")``) whose body is plain
softmax in float64 with the CUDA kernel's conventions, read from torch's sources:

- flash: varlen ``[total, h, d]``, int32 ``cum_seq``, GQA native, causal aligned bottom-right, lse fp32
  ``[h, total_q]`` (+inf for a row that sees no key), the backward returns kv-head gradients;
- cuDNN: the same inputs without GQA (kv heads must equal the query heads: the caller repeats them), causal
  aligned top-left, lse fp32 ``[total_q, h, 1]``, the backward takes philox seed/offset and an undefined bias.

Since the stand-in is a kernel of the aten op itself, the sp kernels call exactly what they call on a GPU,
through the op's real schema: a signature change in torch breaks these tests here.
"""

from __future__ import annotations

import torch

_LIB: torch.library.Library | None = None


def _entries(cu_q: torch.Tensor, cu_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32, (cu_q.dtype, cu_k.dtype)
    q, k = cu_q.tolist(), cu_k.tolist()
    return [(q[i], q[i + 1], k[i], k[i + 1]) for i in range(len(q) - 1)]


def _mask(sq: int, sk: int, causal: bool, bottom_right: bool) -> torch.Tensor | None:
    if not causal:
        return None
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    return j > i + (sk - sq if bottom_right else 0)  # True = hidden


def _attend(q, k, v, scale, causal, bottom_right):
    """One entry: q [sq, h, d], k/v [sk, hk, d] -> out [sq, h, d] (q dtype), lse [h, sq] (float64)."""
    h, hk = q.shape[1], k.shape[1]
    kf = k.double().repeat_interleave(h // hk, dim=1)
    vf = v.double().repeat_interleave(h // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kf) * scale
    m = _mask(q.shape[0], k.shape[0], causal, bottom_right)
    if m is not None:
        s = s.masked_fill(m, float("-inf"))
    lse = torch.logsumexp(s, -1)  # [h, sq]; -inf where a row sees nothing
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    p = torch.where(torch.isinf(lse)[..., None], 0.0, p)
    return torch.einsum("hqk,khd->qhd", p, vf).to(q.dtype), lse


def _attend_backward(dout, q, k, v, out, lse, scale, causal, bottom_right):
    h, hk = q.shape[1], k.shape[1]
    g = h // hk
    kf = k.double().repeat_interleave(g, dim=1)
    vf = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kf) * scale
    m = _mask(q.shape[0], k.shape[0], causal, bottom_right)
    if m is not None:
        s = s.masked_fill(m, float("-inf"))
    p = torch.exp(s - lse.double()[..., None])  # from the given (final) lse
    do = dout.double()
    delta = (do * out.double()).sum(-1).T[..., None]  # [h, sq, 1]
    dp = torch.einsum("qhd,khd->hqk", do, vf)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("hqk,khd->qhd", ds, kf)
    dk = torch.einsum("hqk,qhd->khd", ds, q.double())
    dv = torch.einsum("hqk,qhd->khd", p, do)
    n = k.shape[0]
    # [sk, h, d] -view-> [sk, hk, g, d] -sum-> [sk, hk, d]
    return dq, dk.view(n, hk, g, -1).sum(2), dv.view(n, hk, g, -1).sum(2)


def _scale(scale, d):
    return scale if scale is not None else d**-0.5


def flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                  *, scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                  block_table=None, num_splits=None):  # fmt: skip
    assert dropout_p == 0.0 and not return_debug_mask and cum_seq_q is not None
    assert query.shape[1] % key.shape[1] == 0, "flash: kv heads must divide the query heads"
    sc = _scale(scale, query.shape[2])
    out = torch.zeros_like(query)
    lse = torch.empty(query.shape[1], query.shape[0], dtype=torch.float32)
    for a, b, c, e in _entries(cum_seq_q, cum_seq_k):
        assert b - a <= max_q and e - c <= max_k
        o, l_ = _attend(query[a:b], key[c:e], value[c:e], sc, is_causal, bottom_right=True)
        out[a:b] = o
        lse[:, a:b] = torch.where(torch.isinf(l_), float("inf"), l_).float()  # flash: +inf = no key seen
    rng = torch.zeros(2, dtype=torch.uint64)
    return out, lse, rng, torch.empty(0, dtype=torch.uint64), torch.empty(0, dtype=query.dtype)


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, rng_state, unused, *, scale=None, window_size_left=None,
                   window_size_right=None):  # fmt: skip
    assert dropout_p == 0.0
    assert logsumexp.shape == (query.shape[1], query.shape[0]) and logsumexp.dtype == torch.float32
    sc = _scale(scale, query.shape[2])
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    for a, b, c, e in _entries(cum_seq_q, cum_seq_k):
        g = _attend_backward(grad_out[a:b], query[a:b], key[c:e], value[c:e], out[a:b], logsumexp[:, a:b], sc,
                             is_causal, bottom_right=True)  # fmt: skip
        dq[a:b], dk[c:e], dv[c:e] = (x.to(query.dtype) for x in g)
    return dq, dk, dv


def cudnn_forward(query, key, value, attn_bias, cum_seq_q, cum_seq_k, max_q, max_k, compute_log_sumexp,
                  dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):  # fmt: skip
    assert attn_bias is None and dropout_p == 0.0 and compute_log_sumexp and cum_seq_q is not None
    assert key.shape[1] == query.shape[1], "cuDNN varlen: no GQA (repeat the kv heads)"
    sc = _scale(scale, query.shape[2])
    out = torch.zeros_like(query)
    lse = torch.empty(query.shape[0], query.shape[1], 1, dtype=torch.float32)
    for a, b, c, e in _entries(cum_seq_q, cum_seq_k):
        o, l_ = _attend(query[a:b], key[c:e], value[c:e], sc, is_causal, bottom_right=False)
        out[a:b] = o
        lse[a:b, :, 0] = l_.T.float()
    seed = torch.zeros((), dtype=torch.int64)
    return out, lse, cum_seq_q, cum_seq_k, max_q, max_k, seed, seed.clone(), torch.empty(0)


def cudnn_backward(grad_out, query, key, value, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q,
                   cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale=None):  # fmt: skip
    assert dropout_p == 0.0 and key.shape[1] == query.shape[1]
    assert logsumexp.shape == (query.shape[0], query.shape[1], 1) and logsumexp.dtype == torch.float32
    sc = _scale(scale, query.shape[2])
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    for a, b, c, e in _entries(cum_seq_q, cum_seq_k):
        g = _attend_backward(grad_out[a:b], query[a:b], key[c:e], value[c:e], out[a:b], logsumexp[a:b, :, 0].T,
                             sc, is_causal, bottom_right=False)  # fmt: skip
        dq[a:b], dk[c:e], dv[c:e] = (x.to(query.dtype) for x in g)
    return dq, dk, dv


def register() -> None:
    """CPU kernels for the four aten ops (once per process), and kernel names ``torch_flash_cpu`` /
    ``cudnn_cpu``: the real kernel classes driving them in any dtype."""
    global _LIB
    from functools import partial

    from sp.kernels import KERNELS, CudnnKernel, TorchFlashKernel

    KERNELS["torch_flash_cpu"] = partial(TorchFlashKernel, None, half_only=False)
    KERNELS["cudnn_cpu"] = partial(CudnnKernel, half_only=False)
    if _LIB is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", flash_forward, "CPU")
    lib.impl("_flash_attention_backward", flash_backward, "CPU")
    lib.impl("_cudnn_attention_forward", cudnn_forward, "CPU")
    lib.impl("_cudnn_attention_backward", cudnn_backward, "CPU")
    _LIB = lib
