"""This rank's slice of each parameter: the one place that knows how a parameter is split across ranks.

Under FSDP2 a parameter is a DTensor sharded on dim 0 (rows) over the world mesh; this rank holds a
contiguous run of rows ``[offset, offset + local rows)``. Under ``replicate`` it is a plain tensor (all rows,
offset 0). Loaders and initialisers write only these rows, so no rank ever holds a whole model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

WRAPPER = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper inserts it in parameter names


def canonical(name: str) -> str:
    """A parameter's name as the bare Megatron GPT names it (no checkpoint-wrapper segment)."""
    return name.replace(WRAPPER, "")


def local_view(param: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """(the local tensor to write into, its first global row, the global shape)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return local, int(offset[0]) if len(offset) else 0, tuple(param.shape)
    return param.data, 0, tuple(param.shape)


def local_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, int, tuple[int, ...]]]:
    """(canonical name, local tensor, first global row, global shape) of every parameter."""
    for name, p in model.named_parameters():
        local, offset, shape = local_view(p)
        yield canonical(name), local, offset, shape


def materialize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Storage for a meta-device model's (local) parameters on ``device``, uninitialised."""
    return model.to_empty(device=device)
