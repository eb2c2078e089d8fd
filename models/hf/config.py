"""Hugging Face ``config.json`` <-> :class:`planner.types.ModelShape` (plain JSON: no torch, no transformers).

Reads LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM and Qwen3ForCausalLM (per-head q/k RMSNorm,
``head_dim`` independent of the hidden size) configs in both layouts: transformers 4
(top-level ``rope_theta`` + ``rope_scaling``) and transformers 5 (``rope_parameters``). Anything this model
cannot represent exactly (sliding windows, MoE, biases other than Qwen2's q/k/v, another activation, partial
rotary, an unknown rope type) is a clear error naming the file and the field, never a silent approximation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner.types import ROPE_KEYS, ModelShape, check_rope_scaling

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
                 "Qwen3ForCausalLM": "qwen3"}  # fmt: skip
SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "swiglu", "rms_norm_eps",
                "tie_embeddings", "qkv_bias", "qk_norm", "max_position_embeddings")  # fmt: skip


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
    bad = {
        "sliding_window": cfg.get("sliding_window") is not None
        and (arch == "mistral" or cfg.get("use_sliding_window")),
        "use_sliding_window": bool(cfg.get("use_sliding_window")),
        "num_experts": bool(cfg.get("num_experts") or cfg.get("num_local_experts")),
        "attention_bias": bool(cfg.get("attention_bias")) and arch != "qwen2",
        "mlp_bias": bool(cfg.get("mlp_bias")),
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "layer_types": any(t != "full_attention" for t in cfg.get("layer_types") or []),
    }
    for name, is_bad in bad.items():
        if is_bad:
            raise ValueError(f"{where}: {name}={cfg.get(name)!r} is not supported by this model "
                             "(full causal attention, SwiGLU, no MoE, no o/MLP biases)")  # fmt: skip


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
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6 if arch in ("qwen2", "qwen3") else 1e-5)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "qkv_bias": arch == "qwen2",
        "qk_norm": arch == "qwen3",
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or 0),
        "rope_theta": theta,
        "rope_scaling": scaling,
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
    arch = "Qwen3ForCausalLM" if shape.qk_norm else "Qwen2ForCausalLM" if shape.qkv_bias else "LlamaForCausalLM"
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
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        cfg.update({"attention_bias": False, "mlp_bias": False})
    else:
        cfg.update({"use_sliding_window": False, "sliding_window": None})
    return cfg


def shape_of(fields: dict[str, Any]) -> ModelShape:
    return ModelShape(**resolve(fields))


def shape_from_folder(folder: str | Path, **fields: Any) -> ModelShape:
    """The model of a Hugging Face folder, with ``fields`` (rope, checkpointing, ...) set on top."""
    return shape_of({"name": "hf", **fields, "hf_path": str(folder)})
