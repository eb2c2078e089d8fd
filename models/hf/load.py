"""Hugging Face safetensors into an already sharded model, each rank reading only its own rows.

The model is built on the meta device, sharded (FSDP2: rows of every parameter split over the world), and
materialised; then every rank reads, for each of its parameters, only the rows ``[offset, offset + local)``
it holds, through safetensors' memory-mapped slices (``get_slice(name)[lo:hi]``), fused layouts assembled
by :mod:`models.hf.mapping`. Peak host memory per rank is about its shard plus one slice in flight.
:func:`check` reads only the files' headers, so a bad folder is refused before anything is built or written.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from models.hf.mapping import hf_shapes, parts
from models.shards import local_params
from planner.types import ModelShape

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def open_file(path: Path) -> Any:
    """``safe_open(path)``; a damaged file (truncated, bad header) is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: damaged safetensors file ({e}); download or export it again") from None


class Checkpoint:
    """The tensors of a Hugging Face folder: ``model.safetensors`` or shards listed in the index."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index (no weight_map: {e})") from None
            self.file_of = {k: self.folder / v for k, v in weight_map.items()}
        elif (self.folder / SINGLE).is_file():
            with open_file(self.folder / SINGLE) as f:
                self.file_of = dict.fromkeys(f.keys(), self.folder / SINGLE)
        else:
            raise ValueError(f"{self.folder}: no {SINGLE} and no {INDEX} (the folder holds no Hugging Face weights)")
        for path in sorted(set(self.file_of.values())):
            if not path.is_file():
                raise ValueError(f"{path} is missing (listed in {index.name}); the checkpoint is incomplete")
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _path(self, name: str) -> Path:
        if name not in self.file_of:
            raise ValueError(f"{self.folder}: tensor {name!r} is in no safetensors file of the folder")
        return self.file_of[name]

    def _header(self, name: str) -> Any:
        path = self._path(name)
        if path not in self._open:
            self._open[path] = self._stack.enter_context(open_file(path))
        return self._open[path].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file's header (kept open: headers only, no tensor bytes are touched)."""
        return tuple(self._header(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of tensor ``name`` (``BF16``, ``F32``, ...), from the header."""
        return str(self._header(name).get_dtype())

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``[lo, hi)`` of tensor ``name``: only those bytes are read, and the file's mapping is dropped
        right after, so the pages read do not accumulate in this process's resident memory."""
        with open_file(self._path(name)) as f:
            rows = f.get_slice(name)[lo:hi].clone()
        if rows.is_floating_point() and not torch.isfinite(rows).all():
            raise ValueError(f"{self._path(name)}: tensor {name!r} holds NaN/inf in rows [{lo}, {hi}): the "
                             "checkpoint is damaged (download or export it again)")  # fmt: skip
        return rows  # type: ignore[no-any-return]


FLOAT_DTYPES = ("F32", "BF16", "F16")  # what a weight may be stored as (cast to the run's dtype on load)
IGNORED = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry that no model here has as a weight


def check(folder: str | Path, shape: ModelShape, allow_unexpected: bool = False) -> None:
    """The folder's tensors match the architecture exactly (headers only): every tensor the model needs is
    there with its shape and a floating dtype, and there is no tensor the model would not use (refused unless
    ``allow_unexpected``: ``train.allow_unexpected_weights``). Every offending tensor is named."""
    want = hf_shapes(shape)
    with Checkpoint(folder) as ck:
        missing = sorted(n for n in want if n not in ck.file_of)
        wrong = [f"{n!r} has shape {list(ck.shape(n))}, needs {list(s)}" for n, s in want.items()
                 if n in ck.file_of and ck.shape(n) != s]  # fmt: skip
        dtypes = [f"{n!r} is {ck.dtype(n)}" for n in want if n in ck.file_of and ck.dtype(n) not in FLOAT_DTYPES]
        extra = sorted(n for n in ck.file_of if n not in want and not n.endswith(IGNORED)
                       and not (n == "lm_head.weight" and shape.tie_embeddings))  # fmt: skip
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:8]))
    if dtypes:
        problems.append(f"non-floating tensors (valid: {', '.join(FLOAT_DTYPES)}): " + "; ".join(dtypes[:8]))
    if extra and not allow_unexpected:
        problems.append(
            f"unexpected tensors the model would not use {extra[:8]}{' ...' if len(extra) > 8 else ''} "
            f"({len(extra)}; train.allow_unexpected_weights=true loads the folder without them)"
        )
    if problems:
        raise ValueError(
            f"{folder}: the weights do not match the run's model (model.name={shape.name!r}, "
            f"architecture from {shape.hf_path or 'the run config'}): " + " | ".join(problems)
        )


@torch.no_grad()
def load_into(model: torch.nn.Module, folder: str | Path, shape: ModelShape) -> int:
    """Fill this rank's rows of every parameter from the folder; returns the bytes read."""
    read = 0
    with Checkpoint(folder) as ck:
        for name, local, offset, _ in local_params(model):
            end = offset + local.shape[0]
            for part in parts(name, shape):
                lo, hi = max(offset, part.row), min(end, part.row + part.rows)
                if lo >= hi:
                    continue
                src = ck.rows(part.hf, part.hf_row + lo - part.row, part.hf_row + hi - part.row)
                if local.is_cuda:  # pinned staging: the host-to-device copy runs asynchronously
                    src = src.pin_memory()
                local[lo - offset : hi - offset].copy_(src, non_blocking=local.is_cuda)
                read += src.numel() * src.element_size()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # pinned sources must outlive their copies
    return read
