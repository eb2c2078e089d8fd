"""Block kernels, one per file behind this registry (``SPContext.kernel`` names one):

- ``torch`` (:mod:`sp.kernels.reference`): plain softmax, any device, float64-exact;
- ``cpu_fused`` (:mod:`sp.kernels.cpu_fused`): torch's fused CPU flash op, the trainer's CPU default;
- ``torch_flash`` (:mod:`sp.kernels.torch_flash`): torch's own flash varlen ops (FA2 inside the CUDA wheel);
  ``torch_fa3`` / ``torch_fa4``: the same ops with FlashAttention-3 / 4 activated (their packages installed);
- ``cudnn`` (:mod:`sp.kernels.cudnn`): torch's cuDNN varlen attention ops, CUDA;
- ``flash`` (:mod:`sp.kernels.flash`): the flash-attn 2.8.3 package's varlen calls (optional, a source build).

The fused CUDA kernels share the varlen packing of :mod:`sp.kernels.varlen`.

The protocol, the pair geometry and the dtype rules they share are in :mod:`sp.kernels.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
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
from sp.kernels.cudnn import CudnnKernel
from sp.kernels.flash import FlashKernel, flash_attn_status, flash_calls, parameter_names
from sp.kernels.reference import TorchKernel
from sp.kernels.torch_flash import TorchFlashKernel
from sp.kernels.varlen import Rows, VarlenKernel, VarlenStep, bottom_right_calls, top_left_calls

KERNELS: dict[str, Callable[[], Any]] = {
    "torch": TorchKernel,
    "cpu_fused": CpuFusedKernel,
    "torch_flash": TorchFlashKernel,
    "torch_fa3": partial(TorchFlashKernel, "FA3"),
    "torch_fa4": partial(TorchFlashKernel, "FA4"),
    "cudnn": CudnnKernel,
    "flash": FlashKernel,
}
FUSED_CUDA = ("torch_flash", "torch_fa3", "torch_fa4", "cudnn", "flash")  # need CUDA and bf16/fp16

__all__ = ["FUSED_CUDA", "KERNELS", "TILE_ROWS", "BlockPair", "CpuFusedKernel", "CudnnKernel", "FlashKernel", "Kernel",
           "PairOut", "Rows", "TorchFlashKernel", "TorchKernel", "VarlenKernel", "VarlenStep", "Visibility",
           "backward_pairs", "bottom_right_calls", "classify", "compute_dtype", "flash_attn_status", "flash_calls",
           "forward_pairs", "get_kernel", "lse_dtype", "parameter_names", "top_left_calls",
           "topleft_calls"]  # fmt: skip


def get_kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; valid kernels: {sorted(KERNELS)}")
    if name == "flash":  # the real one; tests register CPU stand-ins under other names
        problem = flash_attn_status()
        if problem is not None:
            raise ValueError(f"kernel 'flash' needs CUDA and a working flash-attn: {problem}")
    kernel: Kernel = KERNELS[name]()
    return kernel
