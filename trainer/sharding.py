"""State sharding, precision and activation checkpointing: the memory regime the planner assumes.

``parallelize(model, ...)`` applies, in torchtitan's order:

1. **Activation checkpointing** (``model.checkpointing``): ``full`` wraps every Megatron ``TransformerLayer``
   in torch's non-reentrant ``checkpoint_wrapper`` (each layer keeps only its input; its forward runs again
   in backward, SP collectives included); ``offload`` is full with that input kept in host memory
   (:mod:`trainer.offload`); ``selective`` wraps each layer's core attention only; ``none``.
   With ``planner.checkpointing`` choices, the wrappers of every chosen mode are installed and a
   :class:`CheckpointSwitch` selects the plan's mode per micro-step.
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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from planner.types import CHECKPOINTING, SHARDINGS
from trainer.config import PRECISIONS
from trainer.offload import OffloadCounter, offloaded


@dataclass(frozen=True)
class Regime:
    """The resolved memory regime of a run (``precision`` never ``auto`` here)."""

    sharding: str
    precision: str
    checkpointing: str
    choices: tuple[str, ...] = ()  # checkpointing modes the plan may switch to per micro-step
    offload_states: bool = False  # FSDP2's CPUOffloadPolicy: parameters, gradients, AdamW moments on the host

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def state_device(self, device: torch.device) -> torch.device:
        """Where the sharded states are materialised: the host under state offload, else ``device``."""
        return torch.device("cpu") if self.offload_states else device


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


@dataclass
class CheckpointSwitch:
    """The activation checkpointing mode the model runs in now. Mutable on purpose: the step sets it before
    each micro-step from the plan (``MicroStep.checkpointing``; "" means ``default``, the model's mode)."""

    mode: str
    default: str
    offload: OffloadCounter = field(default_factory=OffloadCounter)  # bytes on the host in ``offload`` mode

    def set(self, mode: str) -> None:
        self.mode = mode or self.default


def _switched(switch: CheckpointSwitch, wanted: str) -> Any:
    """A ``checkpoint_fn`` for torch's ``checkpoint_wrapper``: checkpoint (non-reentrant) while the switch is
    at ``wanted``, run the module plainly otherwise."""
    from torch.utils.checkpoint import checkpoint

    def run(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if switch.mode == wanted:
            return checkpoint(module, *args, use_reentrant=False, **kwargs)
        if wanted == "full" and switch.mode == "offload":  # full checkpointing, the kept input on the host
            return offloaded(module, switch.offload, *args, **kwargs)
        return module(*args, **kwargs)

    return run


def apply_checkpointing(model: torch.nn.Module, mode: str, choices: tuple[str, ...] = ()) -> CheckpointSwitch:
    """Wrap for ``mode`` and every mode in ``choices`` (the planner's per-micro-step options): ``full`` wraps
    each layer, ``selective`` each layer's core attention; a wrapper checkpoints only while the returned
    switch is at its mode (a full wrapper's inner selective one then runs plainly)."""
    for m in (mode, *choices):
        if m not in CHECKPOINTING:
            raise ValueError(f"model.checkpointing={m!r}; valid: {', '.join(repr(c) for c in CHECKPOINTING)}")
    switch = CheckpointSwitch(mode, mode)
    wanted = {mode, *choices}
    stack = layers(model)
    for i, layer in enumerate(stack):
        if "selective" in wanted:
            attn: Any = layer.self_attention
            attn.core_attention = _wrap(attn.core_attention, switch, "selective")
        if wanted & {"full", "offload"}:
            stack[i] = _wrap(layer, switch, "full")
    return switch


def _wrap(module: torch.nn.Module, switch: CheckpointSwitch, mode: str) -> torch.nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped: Any = checkpoint_wrapper(module, checkpoint_fn=_switched(switch, mode))
    wrapped.sp_switch, wrapped.sp_mode = switch, mode  # read by checkpoint_switch and trainer.memory
    return wrapped


def checkpoint_switch(model: torch.nn.Module) -> CheckpointSwitch | None:
    """The switch :func:`apply_checkpointing` installed in ``model`` (None without checkpointing)."""
    for m in model.modules():
        switch = getattr(m, "sp_switch", None)
        if switch is not None:
            return switch
    return None


def apply_fsdp(model: torch.nn.Module, precision: str, device: torch.device, offload_states: bool = False) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    units = [*layers(model), model]
    # pinned host memory on a GPU node (asynchronous copies); a CPU-only run has nothing to pin
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload_states else OffloadPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=offload)
    for unit in units:  # loss / global tokens: the gradient is the plain SUM (gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]


def parallelize(model: torch.nn.Module, regime: Regime, device: torch.device) -> torch.nn.Module:
    """Checkpointing, then sharding (FSDP) or nothing (replicate), in place; returns the model."""
    if regime.sharding not in SHARDINGS:
        raise ValueError(f"train.sharding={regime.sharding!r}; valid: {list(SHARDINGS)}")
    apply_checkpointing(model, regime.checkpointing, regime.choices)
    if regime.offload_states and regime.sharding != "fsdp":
        raise ValueError(f"optimizer-state offload needs train.sharding=fsdp, got {regime.sharding!r}")
    if regime.sharding == "fsdp":
        apply_fsdp(model, regime.precision, device, regime.offload_states)
    return model


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of the model, unsharded, on the CPU (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}
