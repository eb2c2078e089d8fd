"""Numerically stable merge of two partial softmax-attention results.

Each partial result over a disjoint key set is ``(o_i, lse_i)`` with ``o_i = softmax(s_i) v_i`` and
``lse_i = log sum exp(s_i)``. Over the union of keys the true result is

    lse = log(e^lse_1 + e^lse_2),   o = e^(lse_1 - lse) o_1 + e^(lse_2 - lse) o_2.

Written with ``m = max(lse_1, lse_2)`` subtracted first, every exponent is <= 0, so nothing overflows.
A row with no visible keys has ``lse = -inf`` and ``o = 0``; where both sides are -inf, ``m`` is replaced by
0 so that ``-inf - m`` stays -inf (weight 0) instead of NaN, and the merged row stays (0, -inf).
"""

from __future__ import annotations

import torch


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """In place: ``(out, lse) <- merge((out, lse), (block_out, block_lse))``.

    Shapes: ``out, block_out: [tokens, heads, dim]``; ``lse, block_lse: [heads, tokens]``.
    """
    m = torch.maximum(lse, block_lse)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w_old = torch.exp(lse - m)
    w_new = torch.exp(block_lse - m)
    total = w_old + w_new
    safe = torch.where(total > 0, total, torch.ones_like(total))
    # [heads, tokens] -transpose-> [tokens, heads] -unsqueeze-> [tokens, heads, 1]
    a = (w_old / safe).transpose(0, 1).unsqueeze(-1).to(out.dtype)
    b = (w_new / safe).transpose(0, 1).unsqueeze(-1).to(out.dtype)
    out.mul_(a).add_(block_out * b)
    lse.copy_(m + torch.log(total))
