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
    PairOut,
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


def step_pairs(ctx: SPContext, src: int, kernel: Kernel) -> list[BlockPair]:
    """The row pairs of one ring step for ``kernel``; for a kernel that takes whole pairs, unmasked pairs that
    share their keys and have adjacent query rows (or share their queries and have adjacent keys) are joined
    into one: a zigzag ring step's two chunk pairs become one call, or one varlen entry of a fused kernel
    (2c queries x c keys, or c x 2c), with no gather and no scatter-add (same result, one softmax over the
    union of keys instead of two merged by their lse)."""
    pairs = _rows(block_pairs(ctx, src, kernel.tile_rows))
    if kernel.tile_rows is not None:
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


def _step(ctx: SPContext, src: int, kernel: Kernel) -> tuple[list[BlockPair], Any]:
    """A ring step's pairs and, for a fused varlen kernel, its packing from the micro-step's device tables
    (built and uploaded once for every layer); None for other kernels."""
    pairs = ctx.tables.pairs(src, kernel)
    if getattr(kernel, "pack_step", None) is not None and ctx.tables.has_plans():
        return pairs, ctx.tables.step_plan(src)
    return pairs, None


def _forward_step(kernel: Kernel, q, k, v, ctx: SPContext, src: int, scale: float) -> list[PairOut]:
    pairs, plan = _step(ctx, src, kernel)
    if plan is not None:
        return kernel.forward_pairs(q, k, v, pairs, scale, step=plan)  # type: ignore[attr-defined, no-any-return]
    return forward_pairs(kernel, q, k, v, pairs, scale)


def _backward_step(kernel: Kernel, dout, q, k, v, out, lse, ctx: SPContext, src: int, scale: float, dq, dk,
                   dv) -> None:  # fmt: skip
    pairs, plan = _step(ctx, src, kernel)
    if plan is not None:
        kernel.backward_pairs(dout, q, k, v, out, lse, pairs, scale, dq, dk, dv, step=plan)  # type: ignore[attr-defined]
    else:
        backward_pairs(kernel, dout, q, k, v, out, lse, pairs, scale, dq, dk, dv)


def _disjoint(outs: list[PairOut]) -> bool:
    """Whether the results' row ranges never overlap (each row has at most one result: no merge needed)."""
    spans = sorted((s.start, s.stop) for s, _, _ in outs)
    return all(b <= c for (_, b), (c, _) in zip(spans, spans[1:]))


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
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc, device=q.device)
    if r == 1 and kernel.tile_rows is None and mode != "comm":  # no ring: each row's results from one step
        outs = _forward_step(kernel, q, k, v, ctx, i, scale)
        if len(outs) == 1 and outs[0][0] == slice(0, q.shape[0]):  # one call, every row: its result as is
            return outs[0][1].to(q.dtype), outs[0][2].to(acc)  # views of the op's own results (no copy or merge)
        if _disjoint(outs):  # one result per row: written in the input dtype, padding rows stay (0, -inf)
            out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
            for qr, o, l_ in outs:
                out[qr] = o
                lse[:, qr] = l_
            return out, lse
        return _merged(outs, q, acc, lse)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv: Any = torch.stack([k, v]) if r > 1 else (k, v)  # [2, T, hk, d]: one message per step
    fresh = torch.ones(q.shape[0], dtype=torch.bool)  # rows no block result has reached yet
    for step in range(r):
        nxt = _exchange(kv, ctx, mode, 0, stats) if step < r - 1 else None
        if mode != "comm":
            _merge_all(_forward_step(kernel, q, kv[0], kv[1], ctx, (i - step) % r, scale), out, lse, fresh, acc)
        if nxt is not None:
            kv = nxt.wait()
    return out.to(q.dtype), lse


def _merge_all(outs: list[PairOut], out: torch.Tensor, lse: torch.Tensor, fresh: torch.Tensor, acc) -> None:
    """Block results into the running (out, lse): a row no result has reached yet takes it as is (merging it
    into (0, -inf) gives the same bits), any other merges."""
    for qr, o, l_ in outs:
        if bool(fresh[qr].all()):
            out[qr] = o
            lse[:, qr] = l_
        else:
            merge_into(out[qr], lse[:, qr], o.to(acc), l_.to(acc))
        fresh[qr] = False


def _merged(outs: list[PairOut], q: torch.Tensor, acc, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    _merge_all(outs, out, lse, torch.ones(q.shape[0], dtype=torch.bool), acc)
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
    if r == 1 and mode != "comm":  # no ring: no K/V message, no dK/dV hop
        return _backward_local(dout, q, k, v, out, lse, ctx, kernel, scale)
    if r == 1:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])  # [2, T, hk, d]
    dkv_in: Exchange | None = None
    for step in range(r):
        nxt = _exchange(kv, ctx, mode, 0, stats) if step < r - 1 else None
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # contribution to ring rank i - step's block
        if mode != "comm":
            _backward_step(kernel, dout, q, kv[0], kv[1], out, lse, ctx, (i - step) % r, scale, dq, dkv[0], dkv[1])
        if dkv_in is not None:
            dkv += dkv_in.wait()
        dkv_in = _exchange(dkv, ctx, mode, 1, stats) if r > 1 else Exchange([], dkv)
        if nxt is not None:
            kv = nxt.wait()
    dkv_home = dkv_in.wait() if dkv_in is not None else torch.zeros(kv.shape, dtype=acc, device=kv.device)
    return dq.to(q.dtype), dkv_home[0].to(k.dtype), dkv_home[1].to(v.dtype)


def _backward_local(dout, q, k, v, out, lse, ctx: SPContext, kernel: Kernel, scale: float):
    """Gradients without a ring: the kernel's own where one call covers every row and key (no accumulator, no
    copy); one result per row and per key range written in the input dtype; else accumulated in fp32."""
    acc = compute_dtype(q.dtype)
    pairs, plan = _step(ctx, ctx.ring_rank, kernel)
    whole = getattr(kernel, "backward_whole", None)
    if whole is not None:
        g = whole(dout, q, k, v, out, lse, pairs, scale, step=plan)
        if g is not None:
            return g[0].to(q.dtype), g[1].to(k.dtype), g[2].to(v.dtype)
    if plan is None and kernel.tile_rows is None and _one_per_range(pairs):
        grads = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        for qs, nq, ks, nk, q_pos, k_pos, mask in pairs:
            qr, kr = slice(qs, qs + nq), slice(ks, ks + nk)
            g = kernel.backward(dout[qr], q[qr], k[kr], v[kr], out[qr], lse[:, qr], q_pos, k_pos, mask, scale)
            grads[0][qr], grads[1][kr], grads[2][kr] = g
        return grads[0], grads[1], grads[2]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    _backward_step(kernel, dout, q, k, v, out, lse, ctx, ctx.ring_rank, scale, dq, dk, dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _one_per_range(pairs: list[BlockPair]) -> bool:
    """Every pair has its own query rows and its own keys (one pair per sequence): gradients need no sum."""
    return len({p[0] for p in pairs}) == len(pairs) and len({p[2] for p in pairs}) == len(pairs)
