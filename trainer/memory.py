"""Measured memory: bytes autograd saves for backward, sharded state bytes, peak memory.

:class:`SavedBytes` counts, with ``torch.autograd.graph.saved_tensors_hooks``, the storage bytes of every
tensor saved for backward inside its context, each storage once and parameters excluded (they are states,
counted by :func:`state_bytes`). Under activation checkpointing the checkpointed regions' own saves are
held by torch's checkpoint hooks instead (innermost hooks win) and never reach this counter; what such a
region keeps is its inputs, which forward pre-hooks on every ``CheckpointWrapper`` of ``model`` count. The
storages are kept referenced only while the context is open, so a freed address cannot be reused and
deduplicated by mistake. ``SavedBytes(seen_by=meter)`` opened inside ``meter``'s context counts only the
storages ``meter`` has not seen (a backward's recomputes after the forward that ``meter`` counted).
"""

from __future__ import annotations

import resource
from typing import Any

import torch


def _is_param(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return isinstance(base, torch.nn.Parameter)


class SavedBytes:
    def __init__(self, model: torch.nn.Module | None = None, seen_by: SavedBytes | None = None) -> None:
        self.bytes = 0
        self._seen: dict[tuple[str, int], torch.UntypedStorage] = dict(seen_by._seen) if seen_by else {}
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

    def hold(self, tensors: list[torch.Tensor]) -> None:
        """Count tensors a pass keeps outside autograd's saves (each storage once): the micro-step's derived
        device tables (RoPE cos/sin, :meth:`sp.step_tables.StepTables.derived`), shared by every layer."""
        for t in tensors:
            self._pack(t)

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


class FsdpUnsharded:
    """Peak bytes of FSDP2's unsharded parameters (and, at each group's post-backward, its unsharded
    gradients) while the context is open, counted where FSDP2 swaps a parameter between its sharded and
    unsharded form (``FSDPParam.to_unsharded`` / ``to_sharded``) and before each reduce-scatter
    (``FSDPParamGroup.post_backward``): allocator-independent, like :class:`SavedBytes`. The reduce-scatter's
    own flat buffers are not seen (the planner adds them from a formula). Uses FSDP2's private classes."""

    def __init__(self) -> None:
        self.params_peak = 0
        self.params_and_grads_peak = 0
        self._live = 0
        self._held: dict[int, int] = {}
        self._saved: tuple = ()

    def __enter__(self) -> FsdpUnsharded:
        import torch.distributed.fsdp._fully_shard._fsdp_param as fp
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as fg

        to_u, to_s, post = fp.FSDPParam.to_unsharded, fp.FSDPParam.to_sharded, fg.FSDPParamGroup.post_backward
        self._saved = (fp, fg, to_u, to_s, post)
        meter = self

        def to_unsharded(param: Any) -> None:
            to_u(param)
            if id(param) not in meter._held:
                t = param._unsharded_param
                meter._held[id(param)] = t.numel() * t.element_size()
                meter._live += meter._held[id(param)]
                meter.params_peak = max(meter.params_peak, meter._live)

        def to_sharded(param: Any) -> None:
            to_s(param)
            meter._live -= meter._held.pop(id(param), 0)

        def post_backward(group: Any, *args: Any, **kwargs: Any) -> Any:
            grads = 0
            for p in group.fsdp_params:
                g = getattr(getattr(p, "_unsharded_param", None), "grad", None)
                grads += g.numel() * g.element_size() if g is not None else 0
            meter.params_and_grads_peak = max(meter.params_and_grads_peak, meter._live + grads)
            return post(group, *args, **kwargs)

        fp.FSDPParam.to_unsharded, fp.FSDPParam.to_sharded = to_unsharded, to_sharded  # type: ignore[method-assign,assignment]
        fg.FSDPParamGroup.post_backward = post_backward  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        fp, fg, to_u, to_s, post = self._saved
        fp.FSDPParam.to_unsharded, fp.FSDPParam.to_sharded, fg.FSDPParamGroup.post_backward = to_u, to_s, post
