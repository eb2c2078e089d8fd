"""Hugging Face ``config.json`` <-> :class:`planner.types.ModelShape` (plain JSON: no torch, no transformers).

Reads LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Qwen3ForCausalLM (per-head q/k RMSNorm,
``head_dim`` independent of the hidden size), Qwen3MoeForCausalLM and MixtralForCausalLM configs in both
layouts: transformers 4 (top-level ``rope_theta`` + ``rope_scaling``) and transformers 5 (``rope_parameters``).
Anything this model cannot represent exactly (sliding windows, attention sinks, linear-attention layers, shared
experts, router noise, biases other than Qwen2's q/k/v, another activation, partial rotary, an unknown rope
type) is a clear error naming the file and the field, never a silent approximation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner.types import ROPE_KEYS, ModelShape, check_rope_scaling

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
                 "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe",
                 "MixtralForCausalLM": "mixtral"}  # fmt: skip
MOE = ("qwen3_moe", "mixtral")
SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "swiglu", "rms_norm_eps",
                "tie_embeddings", "qkv_bias", "qk_norm", "max_position_embeddings", "experts", "experts_per_token",
                "expert_ffn", "moe_every", "dense_layers", "norm_topk_prob", "router_aux_loss_coef")  # fmt: skip


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"model.hf_path={str(folder)!r}: {path} does not exist (a Hugging Face model folder has one)")
    try:
        cfg: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return cfg


def rope_of(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, Any]]:
    """(theta, rope_scaling; {} for plain theta) from either layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_KEYS:
        raise ValueError(f"{where}: rope_type {kind!r} is not supported; valid: {sorted(ROPE_KEYS)}")
    if scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    scaling.pop("partial_rotary_factor", None)
    if kind == "default":
        return float(theta), {}
    check_rope_scaling(scaling, where=f"{where} rope_scaling")
    return float(theta), scaling


def _refuse(cfg: dict[str, Any], where: str) -> None:
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: architectures={cfg.get('architectures')!r} is not supported; valid: "
                         f"{sorted(ARCHITECTURES)}")  # fmt: skip
    arch = ARCHITECTURES[arch]
    bad = {
        "sliding_window": cfg.get("sliding_window") is not None
        and (arch in ("mistral", "mixtral") or cfg.get("use_sliding_window")),
        "use_sliding_window": bool(cfg.get("use_sliding_window")),
        "num_experts": bool(cfg.get("num_experts") or cfg.get("num_local_experts")) and arch not in MOE,
        "shared_expert_intermediate_size": bool(cfg.get("shared_expert_intermediate_size")),
        "router_jitter_noise": bool(cfg.get("router_jitter_noise")),
        "attention_sink_bias": bool(cfg.get("attention_sink_bias") or cfg.get("sinks")),
        "attention_bias": bool(cfg.get("attention_bias")) and arch != "qwen2",
        "mlp_bias": bool(cfg.get("mlp_bias")),
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "layer_types": any(t != "full_attention" for t in cfg.get("layer_types") or []),
    }
    for name, is_bad in bad.items():
        if is_bad:
            raise ValueError(f"{where}: {name}={cfg.get(name)!r} is not supported by this model (full causal "
                             "attention, SwiGLU, MoE only as Qwen3-MoE or Mixtral without shared experts or router "
                             "noise, no o/MLP biases)")  # fmt: skip


def shape_fields(folder: str | Path) -> dict[str, Any]:
    """The :class:`ModelShape` fields a Hugging Face folder's config.json sets (rope included)."""
    cfg = read_config(folder)
    where = str(Path(folder) / "config.json")
    _refuse(cfg, where)
    arch = ARCHITECTURES[cfg["architectures"][0]]
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{where}: {key} is missing or not an integer (got {cfg.get(key)!r})")
    heads = cfg["num_attention_heads"]
    theta, scaling = rope_of(cfg, where)
    return {
        "layers": cfg["num_hidden_layers"],
        "hidden": cfg["hidden_size"],
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "ffn": cfg["intermediate_size"],
        "vocab": cfg["vocab_size"],
        "swiglu": True,
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6 if arch in ("qwen2", "qwen3", "qwen3_moe") else 1e-5)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "qkv_bias": arch == "qwen2",
        "qk_norm": arch in ("qwen3", "qwen3_moe"),
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or 0),
        "rope_theta": theta,
        "rope_scaling": scaling,
        **_moe_fields(cfg, arch, where),
    }


def _moe_fields(cfg: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """The MoE fields: Qwen3-MoE (num_experts, moe_intermediate_size, decoder_sparse_step, mlp_only_layers,
    norm_topk_prob) or Mixtral (num_local_experts, every layer MoE with intermediate_size experts, top-k
    renormalised); the aux loss coefficient of either."""
    if arch not in MOE:
        return {"experts": 0, "experts_per_token": 0, "expert_ffn": 0, "moe_every": 1, "dense_layers": (),
                "norm_topk_prob": True, "router_aux_loss_coef": 0.0}  # fmt: skip
    qwen = arch == "qwen3_moe"
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # transformers 5 writes the second for both
    for key, v in (("num_experts", experts), ("num_experts_per_tok", cfg.get("num_experts_per_tok"))):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {key} is missing or not a positive integer (got {v!r})")
    return {
        "experts": experts,
        "experts_per_token": cfg["num_experts_per_tok"],
        "expert_ffn": cfg["moe_intermediate_size"] if qwen else cfg["intermediate_size"],
        "moe_every": int(cfg.get("decoder_sparse_step", 1)) if qwen else 1,
        "dense_layers": tuple(cfg.get("mlp_only_layers") or ()) if qwen else (),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)) if qwen else True,
        "router_aux_loss_coef": float(cfg.get("router_aux_loss_coef", 0.001)),
    }


def resolve(fields: dict[str, Any]) -> dict[str, Any]:
    """A model config (a dict of ModelShape fields) with ``hf_path`` filled from the folder: the
    architecture comes from config.json; ``rope_theta`` / ``rope_scaling`` the user set (not None) win,
    so a stage can raise the base (ProLong: 8e6, then 1.28e8)."""
    if not fields.get("hf_path"):
        return fields
    hf = shape_fields(fields["hf_path"])
    out = dict(fields)
    for key in SHAPE_FIELDS:
        out[key] = hf[key]
    for key in ("rope_theta", "rope_scaling"):
        if fields.get(key) in (None, {}):
            out[key] = hf[key]
    if (out.get("rope_scaling") or {}).get("rope_type", "default") == "default":
        out["rope_scaling"] = {}
    return out


def to_hf_config(
    shape: ModelShape, base: dict[str, Any] | None = None, default_max_positions: int = 0
) -> dict[str, Any]:
    """config.json for ``shape`` (transformers-4 layout, which transformers 4 and 5 both read), on top of
    the source model's config when there is one (keeps token ids and other fields)."""
    arch = hf_architecture(shape)
    if shape.qk_norm and shape.qkv_bias:
        raise ValueError("model.qk_norm with model.qkv_bias has no Hugging Face architecture (Qwen3's attention_bias "
                         "also biases o_proj); valid: one of them")  # fmt: skip
    cfg = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    cfg.update({
        "architectures": [arch], "model_type": ARCHITECTURES[arch], "num_hidden_layers": shape.layers,
        "hidden_size": shape.hidden, "num_attention_heads": shape.heads, "num_key_value_heads": shape.n_kv_heads,
        "head_dim": shape.d_head, "intermediate_size": shape.d_ffn, "vocab_size": shape.vocab,
        "rms_norm_eps": shape.rms_norm_eps, "tie_word_embeddings": shape.tie_embeddings, "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings or cfg.get("max_position_embeddings")
        or default_max_positions or 131072,
        "rope_theta": shape.theta, "rope_scaling": dict(shape.rope_scaling) if shape.rope_scaling else None,
    })  # fmt: skip
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"):
        cfg.update({"attention_bias": False, "mlp_bias": False})
    if arch == "Qwen3MoeForCausalLM":
        cfg.update({"num_experts": shape.experts, "num_experts_per_tok": shape.experts_per_token,
                    "moe_intermediate_size": shape.expert_ffn, "decoder_sparse_step": shape.moe_every,
                    "mlp_only_layers": list(shape.dense_layers), "norm_topk_prob": shape.norm_topk_prob,
                    "router_aux_loss_coef": shape.router_aux_loss_coef, "use_sliding_window": False,
                    "sliding_window": None})  # fmt: skip
    if arch == "MixtralForCausalLM":
        cfg.update({"num_local_experts": shape.experts, "num_experts_per_tok": shape.experts_per_token,
                    "intermediate_size": shape.expert_ffn, "router_aux_loss_coef": shape.router_aux_loss_coef,
                    "sliding_window": None, "router_jitter_noise": 0.0})  # fmt: skip
    else:
        cfg.update({"use_sliding_window": False, "sliding_window": None})
    return cfg


def hf_architecture(shape: ModelShape) -> str:
    """The Hugging Face architecture of a shape (refusing shapes none represents exactly)."""
    if shape.experts:
        if shape.qk_norm:
            return "Qwen3MoeForCausalLM"
        if shape.moe_every != 1 or shape.dense_layers or not shape.norm_topk_prob or shape.d_ffn != shape.expert_ffn:
            raise ValueError("an MoE model without q/k norms exports as Mixtral, which has every layer MoE, "
                             "renormalised top-k and ffn == expert_ffn; this model has moe_every="
                             f"{shape.moe_every}, dense_layers={list(shape.dense_layers)}, norm_topk_prob="
                             f"{shape.norm_topk_prob}, ffn={shape.d_ffn}, expert_ffn={shape.expert_ffn}")  # fmt: skip
        return "MixtralForCausalLM"
    return "Qwen3ForCausalLM" if shape.qk_norm else "Qwen2ForCausalLM" if shape.qkv_bias else "LlamaForCausalLM"


def shape_of(fields: dict[str, Any]) -> ModelShape:
    return ModelShape(**resolve(fields))


def shape_from_folder(folder: str | Path, **fields: Any) -> ModelShape:
    """The model of a Hugging Face folder, with ``fields`` (rope, checkpointing, ...) set on top."""
    return shape_of({"name": "hf", **fields, "hf_path": str(folder)})
