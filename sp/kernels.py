"""Local attention kernels on one (query segment, key segment) pair of the same sequence.

A *pair* is a contiguous run of query rows at positions ``[q_pos, q_pos + nq)`` against a contiguous run of
key rows at positions ``[k_pos, k_pos + nk)`` of the same sequence. :func:`classify` reduces every pair to one
of three cases, so kernels never see a general mask:

- ``SKIP``: nothing visible (keys all padding, or all in the causal future);
- ``FULL``: every query sees every (valid) key;
- ``CAUSAL``: key visible iff ``key position <= query position``.

Keys at positions >= the sequence length are padding; they always form a suffix of a segment, so cutting
``nk`` removes them without a mask. Kernels return the block output and its log-sum-exp (``[heads, nq]``,
-inf where a row sees no key), and the backward takes the *final* merged output and lse (flash-attention's
recomputation trick), so block gradients add up to the exact gradient.

Registry: ``torch`` (reference, any device, float64-exact) and ``flash`` (CUDA + flash_attn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import torch


class Visibility(Enum):
    SKIP = 0
    FULL = 1
    CAUSAL = 2


def classify(q_pos: int, nq: int, k_pos: int, nk: int, seqlen: int, causal: bool) -> tuple[Visibility, int]:
    """Visibility of a pair and the number of valid (non-padding) keys."""
    nk_valid = max(0, min(nk, seqlen - k_pos))
    if nk_valid == 0 or nq == 0:
        return Visibility.SKIP, 0
    if not causal:
        return Visibility.FULL, nk_valid
    if k_pos > q_pos + nq - 1:
        return Visibility.SKIP, 0
    if k_pos + nk_valid - 1 <= q_pos:
        return Visibility.FULL, nk_valid
    return Visibility.CAUSAL, nk_valid


class Kernel(Protocol):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: int,
        k_pos: int,
        mask: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        q_pos: int,
        k_pos: int,
        mask: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class TorchKernel:
    """Plain-softmax reference in PyTorch. GQA: q heads ``h = hk * g`` use kv head ``h // g``."""

    def _scores(self, q, k, q_pos, k_pos, mask, scale):
        nq, h, d = q.shape
        hk = k.shape[1]
        cd = _compute_dtype(q.dtype)
        # [nq, h, d] -view-> [nq, hk, g, d]
        qg = q.to(cd).view(nq, hk, h // hk, d)
        s = torch.einsum("qkgd,nkd->kgqn", qg, k.to(cd)) * scale  # [hk, g, nq, nk]
        if mask:
            qp = torch.arange(q_pos, q_pos + nq, device=q.device)
            kp = torch.arange(k_pos, k_pos + k.shape[0], device=q.device)
            s = s.masked_fill(kp[None, :] > qp[:, None], float("-inf"))
        return s

    def forward(self, q, k, v, q_pos, k_pos, mask, scale):
        nq, h, d = q.shape
        s = self._scores(q, k, q_pos, k_pos, mask, scale)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)  # [hk, g, nq, 1]
        o = torch.einsum("kgqn,nkd->qkgd", p / torch.where(denom > 0, denom, 1.0), v.to(p.dtype))
        # [nq, hk, g, d] -reshape-> [nq, h, d]; kept in the compute dtype (the ring accumulates in fp32)
        out = o.reshape(nq, h, d)
        # [hk, g, nq, 1] -reshape-> [h, nq]
        lse = (m + torch.log(denom)).reshape(h, nq)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, q_pos, k_pos, mask, scale):
        nq, h, d = q.shape
        hk = k.shape[1]
        g = h // hk
        s = self._scores(q, k, q_pos, k_pos, mask, scale)
        cd = s.dtype
        lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
        # [h, nq] -view-> [hk, g, nq, 1]
        p = torch.exp(s - lse_safe.to(cd).view(hk, g, nq, 1))
        # [nq, h, d] -view-> [nq, hk, g, d]
        do = dout.to(cd).view(nq, hk, g, d)
        o = out.to(cd).view(nq, hk, g, d)
        dv = torch.einsum("kgqn,qkgd->nkd", p, do)
        dp = torch.einsum("qkgd,nkd->kgqn", do, v.to(cd))
        # [nq, hk, g] -permute-> [hk, g, nq] -unsqueeze-> [hk, g, nq, 1]
        delta = (do * o).sum(-1).permute(1, 2, 0).unsqueeze(-1)
        ds = p * (dp - delta) * scale
        # [nq, hk, g, d] -reshape-> [nq, h, d]
        dq = torch.einsum("kgqn,nkd->qkgd", ds, k.to(cd)).reshape(nq, h, d)
        dk = torch.einsum("kgqn,qkgd->nkd", ds, q.to(cd).view(nq, hk, g, d))
        return dq, dk, dv  # compute dtype: the ring accumulates them in fp32 and casts once


FlashCall = tuple[int, int, int, bool]  # (first query row, end row, keys, causal)


def flash_calls(nq: int, nk: int, q_pos: int, k_pos: int, mask: bool) -> list[FlashCall]:
    """A pair as flash-attn calls. flash-attn aligns its causal mask bottom-right (query row t of nq sees key
    j <= t + nk - nq); ours is by true position (row i sees key j <= i + q_pos - k_pos). With
    ``off = q_pos - k_pos`` the rows split in three: rows ``i < -off`` see no key (no call: out 0, lse -inf);
    rows ``[e, f)`` are causal, called with keys cut to ``f + off`` so that bottom-right alignment equals
    ours; rows ``i >= nk - 1 - off`` see every key (one unmasked call)."""
    if not mask:
        return [(0, nq, nk, False)]
    off = q_pos - k_pos
    e = min(nq, max(0, -off))
    f = min(nq, max(e, nk - 1 - off))
    calls = []
    if f > e:
        calls.append((e, f, f + off, True))
    if nq > f:
        calls.append((f, nq, nk, False))
    return calls


@dataclass(frozen=True)
class FlashKernel:
    """flash-attn 2 on CUDA (bf16/fp16), called as :func:`flash_calls` splits a pair. ``impl`` replaces
    ``flash_attn_func`` (tests use a CPU stand-in with flash-attn's conventions: bottom-right causal mask,
    ``softmax_lse`` of shape [batch, heads, seqlen_q], +inf for a row that sees no key)."""

    impl: Callable[..., Any] | None = None
    half_only: bool = True

    def _func(self) -> Callable[..., Any]:
        if self.impl is not None:
            return self.impl
        from flash_attn.flash_attn_interface import flash_attn_func

        return flash_attn_func  # type: ignore[no-any-return]

    def forward(self, q, k, v, q_pos, k_pos, mask, scale):
        if self.half_only and q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"kernel 'flash' takes bf16/fp16 tensors, got {q.dtype}; use kernel='torch' for fp32")
        nq, h, d = q.shape
        fn = self._func()
        out = q.new_zeros(nq, h, d, dtype=_compute_dtype(q.dtype))
        lse = torch.full((h, nq), float("-inf"), dtype=torch.float32 if q.dtype != torch.float64 else q.dtype,
                         device=q.device)  # fmt: skip
        for a, b, keys, causal in flash_calls(nq, k.shape[0], q_pos, k_pos, mask):
            # [n, h, d] -unsqueeze-> [1, n, h, d] (flash's batch dim)
            o, l_, _ = fn(q[a:b][None], k[:keys][None], v[:keys][None], softmax_scale=scale, causal=causal,
                          return_attn_probs=True)  # fmt: skip
            out[a:b] = o[0]
            l_ = l_[0, :, : b - a].to(lse.dtype)  # [h, rows]; older versions pad seqlen_q
            lse[:, a:b] = torch.where(torch.isposinf(l_), float("-inf"), l_)  # flash: +inf = no key seen
        return out, lse

    def backward(self, dout, q, k, v, out, lse, q_pos, k_pos, mask, scale):
        # the backward runs the exact reference on the block: flash's private backward API is not stable
        # across versions; the forward (the common path in a training step's recompute) stays fused.
        return TorchKernel().backward(dout, q, k, v, out, lse, q_pos, k_pos, mask, scale)


KERNELS: dict[str, Callable[[], Any]] = {"torch": TorchKernel, "flash": FlashKernel}


def get_kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; valid kernels: {sorted(KERNELS)}")
    if name == "flash":  # the real one; tests register CPU stand-ins under other names
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise ValueError("kernel 'flash' needs the flash_attn package (pip install '.[gpu]') and CUDA") from e
    kernel: Kernel = KERNELS[name]()
    return kernel
