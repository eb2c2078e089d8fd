"""The GPT: megatron-core's ``GPTModel`` on the local layer spec, with :class:`SPCoreAttention` as core attention.

CPU (gloo, megatron-core 0.16.1 on Python 3.11) and CUDA both work: CPU initialisation, no dropout (exact
training), no Megatron positional embedding (RoPE is applied inside the core attention at true positions).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from models.attention import SPCoreAttention
from planner.types import ModelShape


def transformer_config(shape: ModelShape, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    cfg = TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.n_kv_heads,
        kv_channels=shape.d_head,
        ffn_hidden_size=shape.d_ffn,
        gated_linear_unit=shape.swiglu,
        activation_func=torch.nn.functional.silu if shape.swiglu else torch.nn.functional.gelu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        init_method_std=0.02,
    )
    return cfg


def build_gpt(shape: ModelShape, max_len: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> GPTModel:
    """Identical weights on every rank: initialised from ``torch.manual_seed(seed)`` on the CPU."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SPCoreAttention
    torch.manual_seed(seed)
    model = GPTModel(
        config=transformer_config(shape, dtype),
        transformer_layer_spec=spec,
        vocab_size=shape.vocab,
        max_sequence_length=max_len,
        position_embedding_type="none",
        share_embeddings_and_output_weights=False,
    )
    return model
