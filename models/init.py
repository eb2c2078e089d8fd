"""Random initialisation that each rank does for its own rows, identical for any sharding.

Megatron's scheme (normal(0, 0.02) for weights, 0.02 / sqrt(2 layers) for the output projections of
attention and MLP, ones for norms, zeros for biases), drawn in fixed blocks of rows: block ``b`` of a
parameter comes from a generator seeded by (seed, parameter name, b), so a rank that holds rows
``[a, c)`` draws only the blocks that cover them (at most one block beyond its own rows) and every world size
produces the same model, bit for bit, as the single-process :func:`models.gpt.build_gpt`.
"""

from __future__ import annotations

import math
import zlib

import torch

from models.shards import local_params

BLOCK_ELEMS = 1 << 20  # elements per generator block (4 MiB in fp32)
STD = 0.02


def std_of(name: str, layers: int) -> float | None:
    """The normal std of a parameter; None for norms (ones) and biases (zeros)."""
    if name.endswith("layernorm.weight") or name.endswith("_norm.weight") or name.endswith(".bias"):
        return None
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return STD / math.sqrt(2 * layers)
    return STD


@torch.no_grad()
def init_rows(local: torch.Tensor, offset: int, shape: tuple[int, ...], name: str, seed: int, layers: int) -> None:
    """Fill this rank's rows ``[offset, offset + len(local))`` of parameter ``name`` (global ``shape``)."""
    std = std_of(name, layers)
    if std is None:
        local.fill_(0.0 if name.endswith(".bias") else 1.0)
        return
    if local.numel() == 0:
        return
    row = math.prod(shape[1:])
    per_block = max(1, BLOCK_ELEMS // max(row, 1))
    end = offset + local.shape[0]
    for b in range(offset // per_block, (end - 1) // per_block + 1):
        lo, hi = b * per_block, min(shape[0], (b + 1) * per_block)
        g = torch.Generator().manual_seed((seed % 2**31) * 2**32 + zlib.crc32(f"{name}/{b}".encode()))
        block = torch.randn((hi - lo, *shape[1:]), generator=g) * std  # [block rows, ...] on the CPU
        a, c = max(lo, offset), min(hi, end)
        local[a - offset : c - offset].copy_(block[a - lo : c - lo])


def init_random(model: torch.nn.Module, seed: int, layers: int) -> None:
    """Every rank initialises its own rows of every parameter (collective-free)."""
    for name, local, offset, shape in local_params(model):
        init_rows(local, offset, shape, name, seed, layers)
