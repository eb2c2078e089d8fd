"""Independent single-process references used by the tests (plain softmax, per sequence, float64)."""

from __future__ import annotations

import torch


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
