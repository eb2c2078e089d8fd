"""State sharding, precision and activation checkpointing: the memory regime the planner assumes.

``parallelize(model, ...)`` applies, in torchtitan's order:

1. **Activation checkpointing** (``model.checkpointing``): ``full`` wraps every Megatron ``TransformerLayer``
   in torch's non-reentrant ``checkpoint_wrapper`` (each layer keeps only its input; its forward runs again
   in backward, SP collectives included); ``selective`` wraps each layer's core attention only; ``none``.
   Megatron's own recompute is not used: it needs the CUDA RNG tracker.
2. **Sharding** (``train.sharding``): ``fsdp`` = ZeRO-3 with FSDP2, ``fully_shard`` on every layer plus the
   root over a 1-D mesh of the whole world; parameters, gradients and AdamW states live as fp32 shards.
   ``bf16`` precision is ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: each layer is
   all-gathered in bf16 for compute, gradients are reduce-scattered in fp32 into the fp32 master shards.
   FSDP2 averages gradients over the world by default; our loss is already divided by the step's global
   token count (the exact gradient is the SUM over ranks), so the divide factor is set to 1.
   ``replicate`` keeps whole fp32 parameters on every rank (bucketed all-reduce, ``trainer.grad_sync``);
   bf16 then means autocast compute over the fp32 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from planner.types import SHARDINGS
from trainer.config import PRECISIONS


@dataclass(frozen=True)
class Regime:
    """The resolved memory regime of a run (``precision`` never ``auto`` here)."""

    sharding: str
    precision: str
    checkpointing: str

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}; valid: {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The Megatron GPT's transformer layers."""
    stack: Any = model.decoder
    return stack.layers


def apply_checkpointing(model: torch.nn.Module, mode: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    stack = layers(model)
    for i, layer in enumerate(stack):
        if mode == "full":
            stack[i] = checkpoint_wrapper(layer)
        elif mode == "selective":
            attn: Any = layer.self_attention
            attn.core_attention = checkpoint_wrapper(attn.core_attention)
        else:
            raise ValueError(f"model.checkpointing={mode!r}; valid: 'full', 'selective', 'none'")


def apply_fsdp(model: torch.nn.Module, precision: str, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    units = [*layers(model), model]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    for unit in units:  # loss / global tokens: the gradient is the plain SUM (gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]


def parallelize(model: torch.nn.Module, regime: Regime, device: torch.device) -> torch.nn.Module:
    """Checkpointing, then sharding (FSDP) or nothing (replicate), in place; returns the model."""
    if regime.sharding not in SHARDINGS:
        raise ValueError(f"train.sharding={regime.sharding!r}; valid: {list(SHARDINGS)}")
    apply_checkpointing(model, regime.checkpointing)
    if regime.sharding == "fsdp":
        apply_fsdp(model, regime.precision, device)
    return model


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of the model, unsharded, on the CPU (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}
