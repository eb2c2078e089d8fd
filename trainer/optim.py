"""The optimiser and learning-rate schedule a continued-pretraining recipe needs.

- AdamW with configurable betas and eps (``train.beta1``, ``train.beta2``, ``train.eps``; Llama recipes use
  beta2 0.95), fused on CUDA, foreach on the CPU, on the fp32 (sharded) parameters.
- Parameter groups: ``train.no_weight_decay`` names the kinds of parameter trained without weight decay,
  any of ``norm`` (RMSNorm/LayerNorm weights), ``bias`` and ``embedding`` (the input embedding table; a tied
  output layer is the same tensor). Default: none (every parameter decays).
- Schedules (``train.schedule``), each after ``train.warmup_steps`` of linear warmup:
  ``cosine`` (to ``train.min_lr`` at the last step), ``wsd`` (warmup-stable-decay: ``train.lr`` until the last
  ``train.decay_fraction`` of the steps, then linear to ``train.min_lr``), ``constant``.
- A resume with another ``train.steps`` reshapes the cosine and WSD schedules: :func:`schedule_change` says how.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCHEDULES = ("cosine", "wsd", "constant")
NO_DECAY_KINDS = ("norm", "bias", "embedding")


def kind(name: str, param: torch.Tensor) -> str | None:
    """The no-decay kind of a parameter from its name (Megatron GPT names), or None."""
    if name.endswith(".bias"):
        return "bias"
    if "norm" in name.rsplit(".", 2)[-2] and param.dim() == 1:  # input_layernorm, final_layernorm, q/k norms
        return "norm"
    if name.startswith("embedding.") or ".embedding." in name:
        return "embedding"
    return None


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: tuple[str, ...]) -> list[dict[str, Any]]:
    """One group with ``weight_decay`` and, when ``no_decay`` names kinds, one with 0 (empty groups dropped)."""
    decay: list[torch.Tensor] = []
    plain: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if kind(name, p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build(model: torch.nn.Module, t: Any, cuda: bool, on_host: bool = False) -> torch.optim.Optimizer:
    """AdamW from the train config ``t``: fused kernels on CUDA and for states offloaded to the host (torch's
    fused CPU AdamW, ``sp-bench cpu-adam``), foreach on a CPU-only run."""
    fused = cuda or on_host
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay, tuple(t.no_weight_decay)), lr=t.lr, betas=(t.beta1, t.beta2),
        eps=t.eps, weight_decay=t.weight_decay, fused=fused or None, foreach=not fused,
    )  # fmt: skip


def lr_at(step: int, t: Any) -> float:
    """The learning rate of 0-based ``step`` under the train config ``t``."""
    if step < t.warmup_steps:
        return float(t.lr * (step + 1) / t.warmup_steps)
    if t.schedule == "constant":
        return float(t.lr)
    if t.schedule == "wsd":
        start = t.steps - max(1, round(t.decay_fraction * t.steps))
        if step < start:
            return float(t.lr)
        frac = (step - start) / max(1, t.steps - start)
        return float(t.lr - (t.lr - t.min_lr) * min(1.0, frac))
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return float(t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, frac))))


def schedule_change(old: Any, new: Any, step: int) -> str | None:
    """What a resume at ``step`` with another ``train.steps`` does to the schedule; None when nothing."""
    if old.steps == new.steps:
        return None
    a, b = lr_at(step, old), lr_at(step, new)
    if new.schedule == "constant" or (a == b and lr_at(new.steps - 1, new) == lr_at(old.steps - 1, old)):
        return f"train.steps {old.steps} -> {new.steps}: the {new.schedule} schedule is unchanged"
    end = {"cosine": "the cosine reaches train.min_lr", "wsd": "the decay ends"}[new.schedule]
    return (f"train.steps {old.steps} -> {new.steps} at step {step}: the {new.schedule} schedule is recomputed over "
            f"{new.steps} steps; lr at this step {a:.3g} -> {b:.3g}, {end} at step {new.steps} instead of "
            f"{old.steps}")  # fmt: skip
