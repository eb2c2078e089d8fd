"""Rotary position embedding at each token's true in-sequence position (packed SP batches need this:
a token's position is not its row index), with the RoPE variants long-context recipes use.

The inverse frequencies and the cos/sin scale are computed exactly as transformers computes them
(``modeling_rope_utils``: ``default``, ``linear``, ``llama3``, ``yarn``), in float32, and the angles as
``positions (fp32) x inv_freq (fp32)`` like its ``LlamaRotaryEmbedding``, so a model imported from a Hugging
Face folder sees the same rotations there and here. The rotation is the rotate-half convention (the one
Hugging Face Llama/Qwen2 weights are laid out for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Rope:
    """RoPE of one model: ``theta`` and transformers' ``rope_scaling`` dict (None = plain theta)."""

    head_dim: int
    theta: float = 10000.0
    scaling: tuple[tuple[str, Any], ...] = ()  # the rope_scaling dict as sorted items (hashable)
    max_position_embeddings: int = 0

    @staticmethod
    def of(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int = 0) -> Rope:
        return Rope(head_dim, float(theta), tuple(sorted((scaling or {}).items())), max_positions)

    @property
    def kind(self) -> str:
        p = dict(self.scaling)
        return str(p.get("rope_type", p.get("type", "default")))

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """(inverse frequencies ``[head_dim / 2]`` fp32, attention scaling applied to cos and sin)."""
        p, d, base = dict(self.scaling), self.head_dim, self.theta
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(dtype=torch.float) / d))
        kind = self.kind
        if kind == "default":
            return inv, 1.0
        if kind == "linear":
            return inv / p["factor"], 1.0
        if kind == "llama3":
            return _llama3(inv, p), 1.0
        if kind == "yarn":
            return _yarn(d, base, p, self.max_position_embeddings)
        raise ValueError(f"rope_type {kind!r}; valid: 'default', 'linear', 'llama3', 'yarn'")


def _llama3(inv: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    inv_llama = torch.where(wavelen > low_wavelen, inv / factor, inv)  # long wavelengths: divided by factor
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama  # in between: interpolated
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_llama)


def _yarn(d: int, base: float, p: dict[str, Any], max_positions: int) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:
        factor = max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = float(mscale(factor, ms) / mscale(factor, ms_all)) if ms and ms_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (d * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).to(dtype=torch.float) / d)
    extrapolation = 1 - ramp  # 1: keep the original frequency; 0: interpolate by factor
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def rope_tables(rope: Rope, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) ``[tokens, 1, head_dim]`` for ``positions`` ``[tokens]``, in ``dtype``."""
    from sp.step_tables import upload

    inv, scale = rope.inv_freq()
    ang = positions.to(torch.float32)[:, None] * upload(inv, positions.device)[None, :]  # [tokens, dim/2], fp32
    # [tokens, dim/2] -cat-> [tokens, dim] -unsqueeze-> [tokens, 1, dim] (broadcast over heads)
    emb = torch.cat([ang, ang], dim=-1).unsqueeze(1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[tokens, heads, dim]`` rotated (rotate-half convention) with tables from :func:`rope_tables`."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
