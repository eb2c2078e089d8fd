"""The block-kernel protocol and the rules every kernel shares.

A *pair* is a contiguous run of query rows at positions ``[q_pos, q_pos + nq)`` against a contiguous run of
key rows at positions ``[k_pos, k_pos + nk)`` of the same sequence. :func:`classify` reduces every pair to one
of three cases, so kernels never see a general mask:

- ``SKIP``: nothing visible (keys all padding, or all in the causal future);
- ``FULL``: every query sees every (valid) key;
- ``CAUSAL``: key visible iff ``key position <= query position``.

Keys at positions >= the sequence length are padding; they always form a suffix of a segment, so cutting
``nk`` removes them without a mask. Kernels return the block output and its log-sum-exp (``[heads, nq]``,
-inf where a row sees no key), and the backward takes the *final* merged output and lse (flash-attention's
recomputation trick), so block gradients add up to the exact gradient. Dtype rule: kernels compute and
accumulate in :func:`compute_dtype` (fp32 for half-precision inputs) and return in it, except that a fused
kernel may return one op call's output or gradients in the dtype the op produced them (widening them to fp32
is exact); the lse is fp32 (float64 for float64).
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

import torch

TILE_ROWS = 512  # query rows per call for kernels that materialise a score tile (reference, CPU fused)


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
    """A block kernel. ``tile_rows``: the ring cuts pairs into query tiles of that many rows (the kernel's
    score memory is ``tile x keys``); None: pairs go whole (flash keeps no score matrix)."""

    tile_rows: int | None

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs, the input dtype otherwise: what kernels compute and accumulate in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """flash-attn takes and returns its lse in fp32; the float64 reference path keeps float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


BlockPair = tuple[int, int, int, int, int, int, bool]  # q row, q rows, k row, k rows, q pos, k pos, mask
PairOut = tuple[slice, torch.Tensor, torch.Tensor]  # (q rows, out [rows, h, d], lse [h, rows])


def forward_pairs(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pairs: list[BlockPair],
                  scale: float) -> list[PairOut]:  # fmt: skip
    """Every pair of one ring step: one batched call where the kernel has one (flash varlen), else a loop."""
    batched = getattr(kernel, "forward_pairs", None)
    if batched is not None:
        return batched(q, k, v, pairs, scale)  # type: ignore[no-any-return]
    out = []
    for qs, nq, ks, nk, q_pos, k_pos, mask in pairs:
        o, lse = kernel.forward(q[qs : qs + nq], k[ks : ks + nk], v[ks : ks + nk], q_pos, k_pos, mask, scale)
        out.append((slice(qs, qs + nq), o, lse))
    return out


def backward_pairs(kernel: Kernel, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, pairs: list[BlockPair], scale: float,
                   dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:  # fmt: skip
    """Adds every pair's gradients of one ring step into ``dq`` (my rows) and ``dk``/``dv`` (the block's)."""
    batched = getattr(kernel, "backward_pairs", None)
    if batched is not None:
        batched(dout, q, k, v, out, lse, pairs, scale, dq, dk, dv)
        return
    for qs, nq, ks, nk, q_pos, k_pos, mask in pairs:
        qr, kr = slice(qs, qs + nq), slice(ks, ks + nk)
        g = kernel.backward(dout[qr], q[qr], k[kr], v[kr], out[qr], lse[:, qr], q_pos, k_pos, mask, scale)
        dq[qr] += g[0]
        dk[kr] += g[1]
        dv[kr] += g[2]
