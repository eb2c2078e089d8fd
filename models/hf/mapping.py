"""Parameter names and layouts between a Hugging Face Llama/Qwen2/Qwen3 checkpoint and our Megatron GPT.

Every one of our parameters is a stack of row runs of Hugging Face tensors (:class:`Part`); each Hugging Face
tensor belongs to exactly one of ours. The fused layouts are Megatron's, as Megatron-Bridge's QKVMapping and
GatedMLPMapping lay them out:

- ``linear_qkv`` (weight ``[(h + 2 hk) d, hidden]``, bias ``[(h + 2 hk) d]``) is grouped per kv head: for
  each kv group g, its ``h / hk`` query heads (rows of ``q_proj``), then k head g, then v head g;
- ``linear_fc1`` is ``[gate_proj; up_proj]`` (Megatron's SwiGLU: ``silu(first half) * second half``);
- everything else is one tensor under another name; ``lm_head`` is absent when embeddings are tied.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.types import ModelShape

TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",  # Qwen3: per-head RMSNorm [head_dim]
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
PREFIX, HF_PREFIX = "decoder.layers.", "model.layers."


@dataclass(frozen=True)
class Part:
    """Rows ``[hf_row, hf_row + rows)`` of Hugging Face tensor ``hf`` are our rows ``[row, row + rows)``."""

    hf: str
    hf_row: int
    row: int
    rows: int


def parts(name: str, shape: ModelShape) -> list[Part]:
    """The Hugging Face row runs that make up our parameter ``name`` (canonical Megatron name)."""
    if name in TOP:
        return [Part(TOP[name], 0, 0, _rows(name, shape))]
    if not name.startswith(PREFIX):
        raise ValueError(f"parameter {name!r} has no Hugging Face counterpart")
    layer, rest = name[len(PREFIX) :].split(".", 1)
    hf = f"{HF_PREFIX}{layer}."
    if rest in LAYER:
        return [Part(hf + LAYER[rest], 0, 0, _rows(rest, shape))]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        d, hk = shape.d_head, shape.n_kv_heads
        qpg = shape.heads // hk
        out = []
        for g in range(hk):
            base = g * (qpg + 2) * d
            out += [Part(f"{hf}self_attn.q_proj.{kind}", g * qpg * d, base, qpg * d),
                    Part(f"{hf}self_attn.k_proj.{kind}", g * d, base + qpg * d, d),
                    Part(f"{hf}self_attn.v_proj.{kind}", g * d, base + (qpg + 1) * d, d)]  # fmt: skip
        return out
    if rest == "mlp.linear_fc1.weight":
        f = shape.d_ffn
        return [Part(f"{hf}mlp.gate_proj.weight", 0, 0, f), Part(f"{hf}mlp.up_proj.weight", 0, f, f)]
    names = moe_names(shape)
    if rest == "mlp.router.weight":
        return [Part(hf + names["router"], 0, 0, shape.experts)]
    if rest.startswith(EXPERT):
        e, kind = rest[len(EXPERT) :].split(".", 1)
        f = shape.expert_ffn
        if kind == "linear_fc1.weight":  # [gate; up] of expert e
            return [Part(hf + names["gate"].format(e=e), 0, 0, f), Part(hf + names["up"].format(e=e), 0, f, f)]
        if kind == "linear_fc2.weight":
            return [Part(hf + names["down"].format(e=e), 0, 0, shape.hidden)]
    raise ValueError(f"parameter {name!r} has no Hugging Face counterpart")


EXPERT = "mlp.experts.local_experts."  # megatron-core SequentialMLP: local_experts.{e}.linear_fc1/fc2


def moe_names(shape: ModelShape) -> dict[str, str]:
    """Hugging Face names of an MoE layer's router and expert e's gate/up/down projections: Qwen3-MoE's
    (``mlp.gate``, ``mlp.experts.{e}.gate_proj``...) with q/k norms, else Mixtral's (``block_sparse_moe.gate``,
    ``experts.{e}.w1`` gate, ``w3`` up, ``w2`` down)."""
    if shape.qk_norm:
        return {"router": "mlp.gate.weight", "gate": "mlp.experts.{e}.gate_proj.weight",
                "up": "mlp.experts.{e}.up_proj.weight", "down": "mlp.experts.{e}.down_proj.weight"}  # fmt: skip
    moe = "block_sparse_moe."
    return {"router": moe + "gate.weight", "gate": moe + "experts.{e}.w1.weight", "up": moe + "experts.{e}.w3.weight",
            "down": moe + "experts.{e}.w2.weight"}  # fmt: skip


def _rows(key: str, shape: ModelShape) -> int:
    if key.endswith("word_embeddings.weight") or key == "output_layer.weight":
        return shape.vocab
    if key.endswith("q_layernorm.weight") or key.endswith("k_layernorm.weight"):
        return shape.d_head
    return shape.hidden  # norms (1-D, hidden), o_proj and down_proj (hidden rows)


def hf_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``shape`` holds, with its shape."""
    h, d, hk, f = shape.hidden, shape.d_head, shape.n_kv_heads, shape.d_ffn
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h), "model.norm.weight": (h,)}
    if not shape.tie_embeddings:
        out["lm_head.weight"] = (shape.vocab, h)
    moe, names, fe = set(shape.moe_layers()), moe_names(shape), shape.expert_ffn
    for i in range(shape.layers):
        p = f"{HF_PREFIX}{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (shape.heads * d, h),
                p + "self_attn.k_proj.weight": (hk * d, h),
                p + "self_attn.v_proj.weight": (hk * d, h),
                p + "self_attn.o_proj.weight": (h, shape.heads * d),
            }
        )
        if i in moe:
            out[p + names["router"]] = (shape.experts, h)
            for e in range(shape.experts):
                out.update({p + names["gate"].format(e=e): (fe, h), p + names["up"].format(e=e): (fe, h),
                            p + names["down"].format(e=e): (h, fe)})  # fmt: skip
        else:
            out.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                        p + "mlp.down_proj.weight": (h, f)})  # fmt: skip
        if shape.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if shape.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (shape.heads * d,), p + "self_attn.k_proj.bias": (hk * d,),
                        p + "self_attn.v_proj.bias": (hk * d,)})  # fmt: skip
    return out
