"""Block kernels, one per file behind this registry (``SPContext.kernel`` names one):

- ``torch`` (:mod:`sp.kernels.reference`): plain softmax, any device, float64-exact;
- ``cpu_fused`` (:mod:`sp.kernels.cpu_fused`): torch's fused CPU flash op, the trainer's CPU default;
- ``flash`` (:mod:`sp.kernels.flash`): flash-attn 2 varlen calls with the fused backward, CUDA.

The protocol, the pair geometry and the dtype rules they share are in :mod:`sp.kernels.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sp.kernels.base import (
    TILE_ROWS,
    BlockPair,
    Kernel,
    PairOut,
    Visibility,
    backward_pairs,
    classify,
    compute_dtype,
    forward_pairs,
    lse_dtype,
)
from sp.kernels.cpu_fused import CpuFusedKernel, topleft_calls
from sp.kernels.flash import FlashKernel, Rows, flash_attn_status, flash_calls, parameter_names
from sp.kernels.reference import TorchKernel

KERNELS: dict[str, Callable[[], Any]] = {"torch": TorchKernel, "flash": FlashKernel, "cpu_fused": CpuFusedKernel}

__all__ = ["KERNELS", "TILE_ROWS", "BlockPair", "CpuFusedKernel", "FlashKernel", "Kernel", "PairOut", "Rows",
           "TorchKernel", "Visibility", "backward_pairs", "classify", "compute_dtype", "flash_attn_status",
           "flash_calls", "forward_pairs", "get_kernel", "lse_dtype", "parameter_names", "topleft_calls"]  # fmt: skip


def get_kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; valid kernels: {sorted(KERNELS)}")
    if name == "flash":  # the real one; tests register CPU stand-ins under other names
        problem = flash_attn_status()
        if problem is not None:
            raise ValueError(f"kernel 'flash' needs CUDA and a working flash-attn: {problem}")
    kernel: Kernel = KERNELS[name]()
    return kernel
