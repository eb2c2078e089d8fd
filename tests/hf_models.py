"""Tiny random Hugging Face models the interop tests create (nothing is downloaded), perturbed so that
comparisons are not trivially passed by a near-uniform softmax."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=4096)  # fmt: skip
ROPES = {
    "theta": {"rope_theta": 500000.0},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64}},
    "yarn": {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 128}},
}  # fmt: skip


def make(folder: Path, kind: str = "llama3", seed: int = 0, shard: str | None = None, **extra) -> torch.nn.Module:
    """Save a tiny perturbed model: ``kind`` in ROPES (Llama), ``qwen2`` (q/k/v biases, tied embeddings) or
    ``qwen3`` (per-head q/k RMSNorm, head_dim 16 on a 64-wide hidden of 8 heads: the attention is twice as wide
    as the hidden size, untied; ``tie_word_embeddings=True`` in ``extra`` ties them)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "qwen3_moe":  # layer 0 dense (mlp_only_layers), layer 1: 4 experts of 32, top-2 renormalised
        cfg = transformers.Qwen3MoeConfig(**{**TINY, "head_dim": 16, "rope_theta": 1e6, "num_experts": 4,
                                             "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                             "norm_topk_prob": True, "mlp_only_layers": [0],
                                             "router_aux_loss_coef": 0.05, **extra})  # fmt: skip
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind == "mixtral":  # every layer: 4 experts of 48 wide, top-2
        cfg = transformers.MixtralConfig(**{**TINY, "intermediate_size": 48, "num_local_experts": 4,
                                            "num_experts_per_tok": 2, "router_aux_loss_coef": 0.05,
                                            "rope_theta": 1e6, **extra})  # fmt: skip
        model = transformers.MixtralForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**{**TINY, "head_dim": 16, "rope_theta": 1e6, "tie_word_embeddings": False,
                                          **extra})  # fmt: skip
        model = transformers.Qwen3ForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**TINY, "rope_theta": 1e6, "tie_word_embeddings": True, **extra})
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**{**TINY, **ROPES[kind], **extra})
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + torch.randn_like(p) * (0.1 if "norm" not in name else 0.05))
    model.eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return model


def make_folders(root: Path, kinds: list[str], sharded: str, extra: dict[str, dict] | None = None) -> dict[str, Path]:
    """One tiny model folder per kind under ``root`` (``sharded``: saved in 40 KB shards with an index)."""
    out = {}
    for kind in kinds:
        out[kind] = root / kind
        make(out[kind], kind, shard="40KB" if kind == sharded else None, **(extra or {}).get(kind, {}))
    return out


def reference_losses(model: torch.nn.Module, docs: list[torch.Tensor]) -> list[torch.Tensor]:
    """transformers' per-token loss of each document on its own (targets = the next token)."""
    out = []
    for d in docs:
        logits = model(d[None, :-1]).logits[0].float()  # [n - 1, vocab]
        out.append(torch.nn.functional.cross_entropy(logits, d[1:], reduction="none"))
    return out
