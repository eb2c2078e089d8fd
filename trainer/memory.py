"""Measured memory: bytes autograd saves for backward, sharded state bytes, peak memory.

:class:`SavedBytes` counts, with ``torch.autograd.graph.saved_tensors_hooks``, the storage bytes of every
tensor saved for backward inside its context, each storage once and parameters excluded (they are states,
counted by :func:`state_bytes`). Under activation checkpointing the checkpointed regions' own saves are
held by torch's checkpoint hooks instead (innermost hooks win) and never reach this counter; what such a
region keeps is its inputs, which forward pre-hooks on every ``CheckpointWrapper`` of ``model`` count. The
storages are kept referenced only while the context is open, so a freed address cannot be reused and
deduplicated by mistake.
"""

from __future__ import annotations

import resource
from typing import Any

import torch


def _is_param(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return isinstance(base, torch.nn.Parameter)


class SavedBytes:
    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.bytes = 0
        self._seen: dict[tuple[str, int], torch.UntypedStorage] = {}
        self._hooks: Any = None
        self._model = model
        self._handles: list[Any] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not _is_param(t):
            storage = t.untyped_storage()
            key = (str(storage.device), storage.data_ptr())
            if key not in self._seen:
                self._seen[key] = storage
                self.bytes += storage.nbytes()
        return t

    def _region_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        for x in (*args, *kwargs.values()):
            if torch.is_tensor(x):
                self._pack(x)

    def __enter__(self) -> SavedBytes:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

        if self._model is not None:
            for m in self._model.modules():
                switch = getattr(m, "sp_switch", None)
                active = switch is None or switch.mode == getattr(m, "sp_mode", None)
                if isinstance(m, CheckpointWrapper) and active:
                    self._handles.append(m.register_forward_pre_hook(self._region_inputs, with_kwargs=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor shard -> this rank's tensor


def state_bytes(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and AdamW moments (the FSDP shards under fsdp).

    Counted by the tensors' own sizes (FSDP's padding of the last shard and AdamW's scalar ``step`` are
    left out)."""
    params = list(model.parameters())
    out = {"params": 0, "grads": 0, "optim": 0}
    for p in params:
        out["params"] += _local(p).nbytes
        if p.grad is not None:
            out["grads"] += _local(p.grad).nbytes
        for name in ("exp_avg", "exp_avg_sq"):
            if (s := optim.state.get(p, {}).get(name)) is not None:
                out["optim"] += _local(s).nbytes
    return out


def peak_bytes(device: torch.device) -> int:
    """Peak allocated bytes on CUDA; peak resident set size of the process on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
