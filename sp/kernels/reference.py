"""The reference kernel: plain softmax in PyTorch, any device, float64-exact (the tests' yardstick)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sp.kernels.base import TILE_ROWS, compute_dtype


@dataclass(frozen=True)
class TorchKernel:
    """Plain-softmax reference in PyTorch. GQA: q heads ``h = hk * g`` use kv head ``h // g``."""

    tile_rows: int | None = TILE_ROWS  # its score tile is [tile, keys]: the ring tiles pairs for it

    def _scores(self, q, k, q_pos, k_pos, mask, scale):
        nq, h, d = q.shape
        hk = k.shape[1]
        cd = compute_dtype(q.dtype)
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
