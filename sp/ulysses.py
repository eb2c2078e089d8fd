"""Ulysses all-to-all: sequence-sharded ``[T_local, H, D]`` <-> head-sharded ring-local ``[T_ring, H/u, D]``.

Heads are processed in chunks so that the all-to-all of chunk c+1 runs while chunk c is attended
(:mod:`sp.attention`), with one chunk's buffers in flight each way: the working set is a chunk's, so more
chunks hold less (``planner.head_chunks``, a per-micro-step choice; more, smaller collectives). Every
function here works on one chunk: ``hc`` heads of each destination rank.
GQA: when u exceeds the kv head count, kv heads are replicated first (:class:`HeadPlan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class HeadPlan:
    """How q and kv heads split over u Ulysses ranks and ``chunks`` overlap chunks."""

    heads: int
    kv_heads: int
    u: int
    kv_repeat: int  # each kv head is replicated this many times before the split (u > kv_heads)
    chunks: int

    @staticmethod
    def build(heads: int, kv_heads: int, u: int, want_chunks: int) -> HeadPlan:
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"q heads ({heads}) must be a multiple of kv heads ({kv_heads})")
        valid = [d for d in range(1, heads + 1) if heads % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)]
        if u not in valid:
            raise ValueError(
                f"Ulysses degree u={u} does not divide the heads (q heads={heads}, kv heads={kv_heads}); "
                f"valid Ulysses degrees: {valid}"
            )
        rep = u // kv_heads if u > kv_heads else 1
        kv_local = kv_heads * rep // u
        return HeadPlan(heads, kv_heads, u, rep, math.gcd(max(want_chunks, 1), kv_local))

    @property
    def q_local(self) -> int:
        return self.heads // self.u

    @property
    def kv_local(self) -> int:
        return self.kv_heads * self.kv_repeat // self.u

    def expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        # [T, hk, D] -repeat_interleave-> [T, hk * rep, D]: replica i of head h sits at h * rep + i
        return x if self.kv_repeat == 1 else x.repeat_interleave(self.kv_repeat, dim=1)

    def reduce_kv_grad(self, g: torch.Tensor) -> torch.Tensor:
        if self.kv_repeat == 1:
            return g
        t, _, d = g.shape
        # [T, hk * rep, D] -view-> [T, hk, rep, D] -sum-> [T, hk, D]
        return g.view(t, self.kv_heads, self.kv_repeat, d).sum(2)


class CommBuffers:
    """Live bytes of the all-to-all buffers this module allocates (send copies and receive buffers), from the
    post of a collective until its result is taken (:func:`take`), and their peak: allocator-independent, so
    the memory model's Ulysses working set is checked on the CPU (``SPContext.comm_buffers``)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def release(self, n: int) -> None:
        self.live -= n


Posted = tuple[object, torch.Tensor, int]  # (work, recv, bytes allocated for it: the send copy and recv)


def post_seq_to_head(x: torch.Tensor, u: int, chunks: int, c: int, group, meter: CommBuffers | None = None) -> Posted:
    """Start the all-to-all of head chunk ``c`` of ``x`` ``[T_l, H, D]``; returns (work, recv ``[u, T_l, hc, D]``,
    bytes allocated)."""
    t, h, d = x.shape
    hpr = h // u
    hc = hpr // chunks
    # [T_l, H, D] -view-> [T_l, u, H/u, D] -slice chunk-> [T_l, u, hc, D] -permute-> [u, T_l, hc, D]
    send = x.view(t, u, hpr, d)[:, :, c * hc : (c + 1) * hc].permute(1, 0, 2, 3).contiguous()
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return _posted(work, recv, 2 * recv.nbytes, meter)


def _posted(work: object, recv: torch.Tensor, nbytes: int, meter: CommBuffers | None) -> Posted:
    if meter is not None:
        meter.add(nbytes)
    return work, recv, nbytes


def take(posted: Posted, meter: CommBuffers | None) -> torch.Tensor:
    """The received buffer of a collective already waited on; its send copy is released, and the receive
    buffer is counted as consumed (copied out or kept by the caller)."""
    _, recv, nbytes = posted
    if meter is not None:
        meter.release(nbytes)
    return recv


def to_ring_local(recv: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """``[u, T_l, hc, D]`` received from every Ulysses peer -> ring-local ``[T_ring, hc, D]`` (``perm`` None:
    the received order is already ring-local, a view)."""
    u, t, hc, d = recv.shape
    # [u, T_l, hc, D] -reshape-> [u * T_l, hc, D] -index perm-> [T_ring, hc, D]
    flat = recv.reshape(u * t, hc, d)
    return flat if perm is None else flat.index_select(0, perm)  # perm already on the device (SPContext)


def post_head_to_seq(
    y: torch.Tensor, u: int, perm: torch.Tensor | None, group, meter: CommBuffers | None = None
) -> Posted:
    """Start the reverse all-to-all of ring-local ``y`` ``[T_ring, hc, D]``; recv is ``[u, T_l, hc, D]``."""
    t_ring, hc, d = y.shape
    if perm is None:  # ring-local order is the send order (a kernel's output is contiguous: no copy)
        flat = y.contiguous()
    else:
        flat = torch.empty_like(y)
        flat[perm] = y  # undo the ring-local order: flat is [u * T_l, hc, D] in send order
    # [u * T_l, hc, D] -view-> [u, T_l, hc, D]
    send = flat.view(u, t_ring // u, hc, d)
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    copied = flat.data_ptr() != y.data_ptr()
    return _posted(work, recv, recv.nbytes * (2 if copied else 1), meter)


def place_heads(recv: torch.Tensor, out: torch.Tensor, chunks: int, c: int) -> None:
    """Write head chunk ``c`` received as ``[u, T_l, hc, D]`` into ``out`` ``[T_l, H, D]``."""
    u, t, hc, d = recv.shape
    hpr = out.shape[1] // u
    # [T_l, H, D] -view-> [T_l, u, H/u, D]; recv [u, T_l, hc, D] -permute-> [T_l, u, hc, D]
    out.view(t, u, hpr, d)[:, :, c * hc : (c + 1) * hc] = recv.permute(1, 0, 2, 3)
