"""The GPT: megatron-core's ``GPTModel`` on the local layer spec, with :class:`SPCoreAttention` as core attention.

CPU (gloo, megatron-core 0.16.1 on Python 3.11) and CUDA both work: no dropout (exact training), no
Megatron positional embedding (RoPE, with the model's theta and scaling, is applied inside the core attention
at true positions), RMSNorm with the model's epsilon, optional q/k/v biases (Qwen2) and tied embeddings.

The model is always built on the meta device (no memory, no initialisation); :func:`build_gpt` with a
``device`` then materialises it and initialises it with :mod:`models.init` (every rank its own rows when
the trainer shards it first: no rank builds the full model anywhere).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from models import rms_norm
from models.attention import SPCoreAttention
from models.init import init_random
from models.moe import SPRouter
from models.rope import Rope
from models.shards import materialize
from planner.types import MemoryMode, ModelShape


def rope_of(shape: ModelShape) -> Rope:
    return Rope.of(shape.d_head, shape.theta, shape.rope_scaling, shape.max_position_embeddings)


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
        layernorm_epsilon=shape.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=False,  # models.init does it, per rank and row block
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        init_method_std=0.02,
        **_moe_config(shape),
    )
    cfg.sp_rope = rope_of(shape)  # read by SPCoreAttention
    cfg.sp_norm_topk_prob = shape.norm_topk_prob  # read by models.moe.SPRouter
    cfg.sp_router_aux_loss_coef = shape.router_aux_loss_coef  # read by models.moe.begin
    return cfg


def _moe_config(shape: ModelShape) -> dict:
    """megatron-core's MoE settings: sequential experts behind the all-gather dispatcher (no expert
    parallelism), the dense/MoE layer pattern, and none of its own load balancing (models.moe computes
    transformers' loss)."""
    if not shape.experts:
        return {}
    moe = set(shape.moe_layers())
    return {"num_moe_experts": shape.experts, "moe_router_topk": shape.experts_per_token,
            "moe_ffn_hidden_size": shape.expert_ffn, "moe_layer_freq": [int(i in moe) for i in range(shape.layers)],
            "moe_router_load_balancing_type": "none", "moe_aux_loss_coeff": 0.0, "moe_grouped_gemm": False,
            "moe_token_dispatcher_type": "allgather"}  # fmt: skip


def build_meta(
    shape: ModelShape, max_len: int, dtype: torch.dtype = torch.float32, modes: tuple[MemoryMode, ...] = ()
) -> GPTModel:
    """The model on the meta device: shapes only (shard it, then materialise and initialise per rank).
    ``modes``: the memory modes a plan may switch to per micro-step (the planner's choices); the chunked loss
    and sequence tiling are installed when the model or any of them uses them, set to the model's own values."""
    config = transformer_config(shape, dtype)
    spec: Any
    if shape.experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        for layer in {id(s): s for s in spec.layer_specs}.values():  # the dense and the MoE spec
            layer.submodules.self_attention.submodules.core_attention = SPCoreAttention
            if hasattr(layer.submodules.mlp.submodules, "router"):
                layer.submodules.mlp.submodules.router = SPRouter
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=shape.qk_norm)
        spec.submodules.self_attention.submodules.core_attention = SPCoreAttention
    with torch.device("meta"):
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=shape.vocab,
            max_sequence_length=max_len,
            position_embedding_type="none",
            share_embeddings_and_output_weights=shape.tie_embeddings,
        )
    rms_norm.install(model)
    model.sp_head_chunks = shape.head_chunks  # the Ulysses head chunks of a micro-step with no mode of its own
    if shape.loss_chunk_tokens or any(m.loss_chunk_tokens for m in modes):
        from models import loss

        loss.install(model, shape.loss_chunk_tokens)
    if shape.tile_tokens or any(m.tile_tokens for m in modes):
        from models import tiling

        tiling.install(model, shape.tile_tokens)
    _own_loss_storage(model)
    return model


def _own_loss_storage(model: Any) -> None:
    """The per-token loss returned with its own storage. Megatron returns ``loss.transpose(0, 1).contiguous()``,
    a view for a batch of one ([s, 1] -> [1, s] is already contiguous); FSDP2 hangs its root pre-backward hook on
    the model's output and warns that an in-place op on a view output would drop it (and skip the all-gather).
    A copy of one float per token removes the hazard and the warning."""
    inner = model.compute_language_model_loss

    def loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = inner(labels, logits)
        return out if out._base is None else out.clone()

    model.compute_language_model_loss = loss


def build_gpt(
    shape: ModelShape, max_len: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> GPTModel:
    """The whole model on one process, initialised from ``seed`` (:mod:`models.init`): the same weights
    the trainer's ranks initialise for their own rows."""
    model = materialize(build_meta(shape, max_len, dtype), torch.device(device))
    init_random(model, seed, shape.layers)
    return model
