"""Independent single-process references used by the tests (plain softmax, per sequence, float64)."""

from __future__ import annotations

import torch

from tests.dist import prepared_pool


def reference_attention(q, k, v, cu_seqlens, causal=True, scale=None):
    """q [T, H, D], k/v [T, Hk, D] packed; attention computed separately for each sequence."""
    h, hk, d = q.shape[1], k.shape[1], q.shape[2]
    scale = d**-0.5 if scale is None else scale
    outs = []
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs = q[a:b].transpose(0, 1)  # [H, L, D]
        ks = k[a:b].repeat_interleave(h // hk, dim=1).transpose(0, 1)
        vs = v[a:b].repeat_interleave(h // hk, dim=1).transpose(0, 1)
        s = qs @ ks.transpose(1, 2) * scale
        if causal:
            n = b - a
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((torch.softmax(s, dim=-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


LONG_CU = [0, 1024, 2524, 2824]  # long causal segments: 512-row tiles meet keys at other offsets


def _long_inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(LONG_CU[-1], n, 8, generator=g, dtype=torch.float64) for n in (4, 2, 2, 4)]


def long_segments_worker(rank, world, kernel, shapes, setup=None):
    """On every rank: sp.attention with ``kernel`` on each (u, r) of ``shapes`` over LONG_CU, forward and
    backward; returns {(u, r): [out, dq, dk, dv]} of this rank's shard (``setup()`` first, e.g. register)."""
    import sp

    if setup is not None:
        setup()
    pool = prepared_pool(world)
    q, k, v, do = _long_inputs()
    out = {}
    for u, r in shapes:
        if rank >= u * r:
            continue
        ctx = pool.context(tuple(range(u * r)), u, r, LONG_CU, kernel=kernel)
        local = [sp.shard(x, ctx.layout, ctx.rank).requires_grad_(True) for x in (q, k, v)]
        o = sp.attention(*local, ctx)
        o.backward(sp.shard(do, ctx.layout, ctx.rank))
        out[(u, r)] = [o.detach(), *(x.grad for x in local)]
    return out


def check_long_segments(parts):
    """Every (u, r) result of :func:`long_segments_worker`, unsharded, equals the float64 reference."""
    import sp

    q, k, v, do = _long_inputs()
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    o = reference_attention(q, k, v, LONG_CU, causal=True)
    o.backward(do)
    ref = [o.detach(), q.grad, k.grad, v.grad]
    for (u, r), _ in parts[0].items():
        layout = sp.GroupLayout.build(LONG_CU, u, r)
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            full = sp.unshard([parts[rk][(u, r)][i] for rk in range(u * r)], layout)
            assert torch.allclose(full, ref[i], atol=1e-10), f"u={u} r={r} {name}"
