"""Ring attention over zigzag-sharded, packed variable-length sequences (forward and backward).

Each of the r ring ranks holds a ring-local buffer of q/k/v (see :mod:`sp.layout`). K and V circulate: at
step t, ring rank i holds the K/V of ring rank ``i - t`` and attends to it. The exchange for step t+1 is
posted *before* step t's compute (double buffer), so the transfer runs under the compute. Partial results
merge with the stable log-sum-exp merge of :mod:`sp.merge`. Only pairs of segments of the same sequence
meet, and causal masking uses true positions, so sequences never see each other.

Precision: the output, lse, dq and the travelling dK/dV accumulate in fp32 (float64 stays float64) and are
cast to the input dtype once at the end, as ring-flash-attn does; in bf16, rounding every block's
contribution before summing would grow the error with the number of blocks and ring steps.

Backward recomputes block probabilities from the final (out, lse). dK/dV accumulators travel with their
K/V block: at step t the rank adds its contribution to the block of rank ``i - t`` and forwards it; after
the last step one more hop brings every accumulator home. The dK/dV hop of step t runs under step t+1's
compute. ``mode`` lets the benchmark time ``"compute"`` (no exchange) or ``"comm"`` (no compute) alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sp.comm import Exchange, bytes_of, ring_exchange
from sp.context import SPContext
from sp.kernels import (
    TILE_ROWS,
    BlockPair,
    Kernel,
    Visibility,
    backward_pairs,
    classify,
    compute_dtype,
    forward_pairs,
)
from sp.layout import Segment
from sp.merge import merge_into


@dataclass
class RingStats:
    """Bytes this rank sent over the ring (filled when passed to the ring functions)."""

    bytes_sent: int = 0
    steps: list[float] = field(default_factory=list)


Pair = tuple[Segment, Segment, bool, int]  # (q segment, k segment, causal mask?, valid keys)


def block_pairs(ctx: SPContext, src: int, tile: int | None = TILE_ROWS) -> list[Pair]:
    """Visible (q segment, k segment) pairs between my ring-local rows and ring rank ``src``'s K/V, cut into
    query tiles of ``tile`` rows (None: whole segments, for kernels that keep no score matrix)."""
    by_seq: dict[int, list[Segment]] = {}
    for ks in ctx.ring_segments[src]:
        by_seq.setdefault(ks.seq, []).append(ks)
    pairs: list[Pair] = []
    lens = ctx.layout.seqlens
    for qs in ctx.ring_segments[ctx.ring_rank]:
        for ks in by_seq.get(qs.seq, ()):
            pairs.extend(_tiles(qs, ks, lens[qs.seq], ctx.causal, tile or max(qs.length, 1)))
    return pairs


def _tiles(qs: Segment, ks: Segment, seqlen: int, causal: bool, rows: int) -> list[Pair]:
    """The visible pairs of query tiles (``rows`` rows) against ``ks``. Tiling bounds a block's score matrix
    to ``rows x keys`` and, for causal pairs, cuts each tile's keys at its last position, so the kernel skips
    the masked upper triangle (about half the work of a long diagonal block)."""
    out: list[Pair] = []
    for a in range(0, qs.length, rows):
        n = min(rows, qs.length - a)
        tile = Segment(qs.seq, qs.start + a, n, qs.pos + a)
        keys = min(ks.length, tile.pos + n - ks.pos) if causal else ks.length
        vis, nk = classify(tile.pos, n, ks.pos, max(keys, 0), seqlen, causal)
        if vis is not Visibility.SKIP:
            out.append((tile, ks, vis is Visibility.CAUSAL, nk))
    return out


def _rows(pairs: list[Pair]) -> list[BlockPair]:
    """Pairs as row ranges of the local buffers, for the kernels' batched entry points."""
    return [(qs.start, qs.length, ks.start, nk, qs.pos, ks.pos, mask) for qs, ks, mask, nk in pairs]


def _step_pairs(ctx: SPContext, src: int, kernel: Kernel) -> list[BlockPair]:
    """The row pairs of one ring step for ``kernel``; for a kernel that takes whole pairs one call at a time,
    unmasked pairs that share their keys and have adjacent query rows (or share their queries and have adjacent
    keys) are joined into one call: a zigzag ring step's two chunk pairs become one (same result, one softmax over
    the union of keys instead of two merged by their lse)."""
    pairs = _rows(block_pairs(ctx, src, kernel.tile_rows))
    if kernel.tile_rows is not None or hasattr(kernel, "forward_pairs"):
        return pairs
    out: list[BlockPair] = []
    for p in pairs:
        if out and not p[6] and not out[-1][6]:
            qs, nq, ks, nk, q_pos, k_pos, _ = out[-1]
            if (ks, nk) == (p[2], p[3]) and qs + nq == p[0]:  # same keys, next query rows
                out[-1] = (qs, nq + p[1], ks, nk, q_pos, k_pos, False)
                continue
            if (qs, nq) == (p[0], p[1]) and ks + nk == p[2]:  # same queries, next keys
                out[-1] = (qs, nq, ks, nk + p[3], q_pos, k_pos, False)
                continue
        out.append(p)
    return out


def _direct_pairs(ctx: SPContext, kernel: Kernel) -> list[BlockPair] | None:
    """Without a ring (r = 1) a kernel that takes whole pairs meets each sequence's rows and keys in exactly one
    pair: its results can go straight into input-dtype outputs (one fp32 value rounded once, as the
    accumulating path rounds it at its end: the same bits). None where that does not hold."""
    if ctx.r != 1 or kernel.tile_rows is not None or hasattr(kernel, "forward_pairs"):
        return None
    pairs = _rows(block_pairs(ctx, ctx.ring_rank, None))
    if len({p[0] for p in pairs}) != len(pairs) or len({p[2] for p in pairs}) != len(pairs):
        return None
    return pairs


def _covers(pairs: list[BlockPair], rows: int, keys: int) -> bool:
    """Whether one pair holds every local query row and key (one unpadded sequence without a ring)."""
    return len(pairs) == 1 and pairs[0][0] == 0 and pairs[0][1] == rows and pairs[0][2] == 0 and pairs[0][3] == keys


def _exchange(buf: torch.Tensor, ctx: SPContext, mode: str, tag: int, stats: RingStats | None) -> Exchange:
    if mode == "compute":
        return Exchange([], buf)
    if stats is not None:
        stats.bytes_sent += bytes_of(buf)
    return ring_exchange(buf, ctx.ring_global_ranks, ctx.ring_rank, ctx.ring_group, tag, ctx.timer)


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: SPContext,
    kernel: Kernel,
    scale: float,
    mode: str = "full",
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[T, h, d]``, k/v ``[T, hk, d]`` ring-local -> out ``[T, h, d]``, lse ``[h, T]``.

    A block result for rows no block has reached yet is copied into place (merging it into (0, -inf) gives
    the same bits); any other merges. Rows no block reaches stay (0, -inf)."""
    r, i = ctx.r, ctx.ring_rank
    acc = compute_dtype(q.dtype)
    direct = _direct_pairs(ctx, kernel)
    if direct is not None and mode != "comm" and _covers(direct, q.shape[0], k.shape[0]):
        qs, nq, ks, nk, q_pos, k_pos, mask = direct[0]  # one pair, every row and key: the kernel's result as is
        o, l_ = kernel.forward(q, k, v, q_pos, k_pos, mask, scale)
        return o.to(q.dtype), l_.to(acc)  # views of the op's own results (no copy, no fill, no merge)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc, device=q.device)
    if direct is not None:  # one result per row: written in the input dtype, padding rows stay (0, -inf)
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        for qs, nq, ks, nk, q_pos, k_pos, mask in direct if mode != "comm" else ():
            o, l_ = kernel.forward(q[qs : qs + nq], k[ks : ks + nk], v[ks : ks + nk], q_pos, k_pos, mask, scale)
            out[qs : qs + nq] = o
            lse[:, qs : qs + nq] = l_
        return out, lse
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv: Any = torch.stack([k, v]) if r > 1 else (k, v)  # [2, T, hk, d]: one message per step
    fresh = torch.ones(q.shape[0], dtype=torch.bool)  # rows no block result has reached yet
    for step in range(r):
        nxt = _exchange(kv, ctx, mode, 0, stats) if step < r - 1 else None
        if mode != "comm":
            for qr, o, l_ in forward_pairs(kernel, q, kv[0], kv[1], _step_pairs(ctx, (i - step) % r, kernel), scale):
                if bool(fresh[qr].all()):
                    out[qr] = o
                    lse[:, qr] = l_
                else:
                    merge_into(out[qr], lse[:, qr], o.to(acc), l_.to(acc))
                fresh[qr] = False
        if nxt is not None:
            kv = nxt.wait()
    return out.to(q.dtype), lse


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    ctx: SPContext,
    kernel: Kernel,
    scale: float,
    mode: str = "full",
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ring_forward` for my ring-local q, k, v."""
    r, i = ctx.r, ctx.ring_rank
    acc = compute_dtype(q.dtype)
    direct = _direct_pairs(ctx, kernel)
    if direct is not None and mode != "comm" and _covers(direct, q.shape[0], k.shape[0]):
        qs, nq, ks, nk, q_pos, k_pos, mask = direct[0]  # one pair, every row and key: the kernel's gradients as is
        g = kernel.backward(dout, q, k, v, out, lse, q_pos, k_pos, mask, scale)
        return g[0].to(q.dtype), g[1].to(k.dtype), g[2].to(v.dtype)
    if direct is not None:  # one pair per row range and per key range: no accumulation, input-dtype gradients
        grads = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        for qs, nq, ks, nk, q_pos, k_pos, mask in direct if mode != "comm" else ():
            qr, kr = slice(qs, qs + nq), slice(ks, ks + nk)
            g = kernel.backward(dout[qr], q[qr], k[kr], v[kr], out[qr], lse[:, qr], q_pos, k_pos, mask, scale)
            grads[0][qr], grads[1][kr], grads[2][kr] = g
        return grads[0], grads[1], grads[2]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    if r == 1:  # no ring: no K/V message, no dK/dV hop
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        if mode != "comm":
            backward_pairs(kernel, dout, q, k, v, out, lse, _step_pairs(ctx, i, kernel), scale,
                           dq, dk, dv)  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    kv = torch.stack([k, v])  # [2, T, hk, d]
    dkv_in: Exchange | None = None
    for step in range(r):
        nxt = _exchange(kv, ctx, mode, 0, stats) if step < r - 1 else None
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # contribution to ring rank i - step's block
        if mode != "comm":
            pairs = _step_pairs(ctx, (i - step) % r, kernel)
            backward_pairs(kernel, dout, q, kv[0], kv[1], out, lse, pairs, scale, dq, dkv[0], dkv[1])
        if dkv_in is not None:
            dkv += dkv_in.wait()
        dkv_in = _exchange(dkv, ctx, mode, 1, stats) if r > 1 else Exchange([], dkv)
        if nxt is not None:
            kv = nxt.wait()
    dkv_home = dkv_in.wait() if dkv_in is not None else torch.zeros(kv.shape, dtype=acc, device=kv.device)
    return dq.to(q.dtype), dkv_home[0].to(k.dtype), dkv_home[1].to(v.dtype)
