"""Megatron-core ``core_attention`` plug-in that runs :func:`sp.attention` with the step's SPContext.

Megatron passes ``packed_seq_params`` down to every layer's core attention; :class:`SPPackedSeqParams`
carries our :class:`~sp.context.SPContext` in it, so the groups travel with the batch and no module holds
process-group state. RoPE is applied here, at each token's true in-sequence position (``ctx.position_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

import sp
from models.rope import Rope, apply_rope, rope_tables
from sp.context import SPContext


@dataclass
class SPPackedSeqParams(PackedSeqParams):
    """``sp_ctx=None`` is an *empty pass*: a rank the plan leaves idle in a micro-step still runs the layers
    (FSDP's all-gathers and reduce-scatters are world collectives) on a dummy token whose loss it zeroes."""

    sp_ctx: SPContext | None = None


class SPCoreAttention(MegatronModule):
    """Drop-in for Megatron's DotProductAttention: ``[s, b=1, heads, dim]`` in, ``[s, 1, heads * dim]`` out."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str, **kwargs: Any):
        super().__init__(config=config)
        self.rope: Rope | None = getattr(config, "sp_rope", None)  # set by models.gpt; None: no RoPE

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any = None,
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: SPPackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is None:
            raise ValueError("SPCoreAttention needs packed_seq_params=SPPackedSeqParams(sp_ctx=...) in the forward")
        ctx = packed_seq_params.sp_ctx
        if ctx is None:  # the empty pass: no attention; q, k and v stay in the graph so that every parameter
            # gets a (zero) gradient on every rank, as FSDP's reduce-scatter needs.
            # [s, 1, heads, dim] -reshape-> [s, 1, heads * dim]
            return query.reshape(query.shape[0], 1, -1) * 0 + (key.sum() + value.sum()) * 0
        if query.shape[1] != 1:
            raise ValueError(f"packed SP batches have batch size 1, got query shape {tuple(query.shape)}")
        # [s, 1, heads, dim] -select batch-> [s, heads, dim]
        q, k, v = query[:, 0], key[:, 0], value[:, 0]
        if self.rope is not None:
            rope = self.rope  # cos/sin at true in-sequence positions, built once per micro-step for every layer
            cos, sin = ctx.tables.memo(("rope", rope, q.dtype), lambda: rope_tables(rope, ctx.position_ids, q.dtype))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = sp.attention(q.contiguous(), k.contiguous(), v.contiguous(), ctx)
        # [s, heads, dim] -reshape-> [s, 1, heads * dim]
        return out.reshape(out.shape[0], 1, -1)
