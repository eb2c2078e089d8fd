"""``sp-bench attention``: fwd+bwd time, bytes sent, ring overlap and activation memory per strategy.

One JSON object per case. The hidden fraction of ring P2P time is
``(t_compute_only + t_comm_only - t_ring) / t_comm_only``: 1 when the transfer hides entirely behind the
block compute, 0 when it adds up serially. Activation memory is the bytes the attention saves for backward
(exact, from the autograd node), plus the growth of the process's peak RSS during the case.
"""

from __future__ import annotations

import resource

import torch

from trainer.profile import best_time

HEADS, KV_HEADS, HEAD_DIM = 4, 4, 32


def batch_lengths(total: int) -> list[int]:
    """Long-tailed packed batch of ``total`` tokens: one sequence of half, the rest in 16 short ones."""
    rest = total - total // 2
    return [total // 2] + [rest // 16 + (1 if i < rest % 16 else 0) for i in range(16)]


def _case(rank: int, world: int, pool, u: int, r: int, total: int, reps: int) -> dict:
    import torch.distributed as dist

    import sp
    from sp.kernels import get_kernel
    from sp.ring import RingStats, ring_backward, ring_forward

    lengths = batch_lengths(total)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    ctx = pool.context(tuple(range(world)), u, r, cu)
    g = torch.Generator().manual_seed(0)
    n_local = ctx.layout.local_tokens
    q = torch.randn(n_local, HEADS, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(n_local, KV_HEADS, HEAD_DIM, generator=g, requires_grad=True)
    v = torch.randn(n_local, KV_HEADS, HEAD_DIM, generator=g, requires_grad=True)
    saved_bytes = [0]

    def step():
        out = sp.attention(q, k, v, ctx)
        saved_bytes[0] = sum(t.numel() * t.element_size() for t in out.grad_fn.saved_tensors)
        out.sum().backward()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dist.barrier()
    t_full = best_time(step, reps, warmup=False)
    row = {
        "strategy": "ulysses" if r == 1 else ("ring" if u == 1 else "hybrid"),
        "world": world,
        "u": u,
        "r": r,
        "total_tokens": total,
        "fwd_bwd_ms": 1e3 * t_full,
        "saved_activation_mib": saved_bytes[0] / 2**20,
        "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
    }
    a2a = 0
    if u > 1:  # q, k, v, o forward and dq, dk, dv, do backward; each keeps 1/u of its bytes at home
        a2a = 8 * n_local * HEADS * HEAD_DIM * 4 * (u - 1) // u
    stats = RingStats()
    if r > 1 and u == 1:
        kern, scale = get_kernel("torch"), HEAD_DIM**-0.5
        qd, kd, vd = q.detach(), k.detach(), v.detach()

        def ring(mode, st=None):
            def f():
                o, lse = ring_forward(qd, kd, vd, ctx, kern, scale, mode, st)
                ring_backward(torch.ones_like(o), qd, kd, vd, o, lse, ctx, kern, scale, mode, st)

            return f

        ring("full", stats)()
        dist.barrier()
        t_ring = best_time(ring("full"), reps, warmup=False)
        dist.barrier()
        t_comp = best_time(ring("compute"), reps, warmup=False)
        dist.barrier()
        t_comm = best_time(ring("comm"), reps, warmup=False)
        row.update(
            ring_ms=1e3 * t_ring,
            compute_only_ms=1e3 * t_comp,
            comm_only_ms=1e3 * t_comm,
            hidden_fraction=(t_comp + t_comm - t_ring) / t_comm if t_comm > 0 else None,
        )
    elif r > 1:
        # ring bytes of a hybrid: K/V blocks of the ring-local (u-gathered) buffer, heads / u
        blk = 2 * ctx.layout.local_tokens * u * KV_HEADS // u * HEAD_DIM * 4
        stats.bytes_sent = blk * (r - 1) * 2 + blk * r
    row["bytes_sent_per_rank"] = a2a + stats.bytes_sent
    return row


def _worker(rank: int, world: int, cases: list[tuple[int, int, int, int]]) -> list[dict]:
    import sp

    pool = sp.GroupPool()
    return [_case(rank, world, pool, u, r, total, reps) for (u, r, total, reps) in cases]


def run(world: int, totals: list[int], strategies: list[tuple[int, int]], timeout: float = 1800) -> list[dict]:
    from sp.spawn import run_distributed

    cases = [(u, r, t, 2 if t <= 16384 else 1) for t in totals for (u, r) in strategies]
    per_rank = run_distributed(_worker, world, cases, timeout=timeout)
    rows = []
    for i, row in enumerate(per_rank[0]):
        row = dict(row)
        row["fwd_bwd_ms"] = max(pr[i]["fwd_bwd_ms"] for pr in per_rank)  # the slowest rank sets the pace
        row["peak_rss_growth_mib"] = max(pr[i]["peak_rss_growth_mib"] for pr in per_rank)
        rows.append(row)
    return rows
