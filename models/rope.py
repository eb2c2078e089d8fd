"""Rotary position embedding at each token's true in-sequence position (packed SP batches need this:
a token's position is not its row index)."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x ``[tokens, heads, dim]`` rotated by ``positions`` ``[tokens]`` (rotate-half convention)."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    ang = positions.to(x.device, torch.float64)[:, None] * inv[None, :]  # [tokens, dim/2]
    # [tokens, dim/2] -cat-> [tokens, dim] -unsqueeze-> [tokens, 1, dim] (broadcast over heads)
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1).unsqueeze(1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1).unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
