"""One of our checkpoints -> a Hugging Face folder, streamed tensor by tensor.

Each of our parameters is read alone from the DCP checkpoint (whole, on the CPU: DCP assembles it from every
rank's shard files), split into its Hugging Face tensors (:mod:`models.hf.mapping`), cast, and buffered
until a safetensors shard reaches ``max_shard_bytes``; then the shard is written and freed. Peak memory is
one parameter plus one shard. The folder gets ``model-0000k-of-0000n.safetensors``, the index,
``config.json`` with the run's shape and rope settings, and the run's tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from models.hf.config import to_hf_config
from models.hf.mapping import parts
from planner.types import ModelShape

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
RUN_HF_CONFIG = "hf_config.json"  # the source model's config.json, kept in the run folder
RUN_TOKENIZER = "tokenizer"  # the run's tokenizer files, kept in the run folder


def model_shape(flat: dict[str, Any]) -> ModelShape:
    """The run's model from its stored flat config (``model.*`` keys)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(ModelShape)}
    return ModelShape(**{k[6:]: v for k, v in flat.items() if k.startswith("model.") and k[6:] in names})


def split(name: str, full: torch.Tensor, shape: ModelShape) -> dict[str, torch.Tensor]:
    """Our parameter ``name`` (whole) as its Hugging Face tensors."""
    by_hf: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for p in parts(name, shape):
        by_hf.setdefault(p.hf, []).append((p.hf_row, full[p.row : p.row + p.rows]))
    return {hf: torch.cat([t for _, t in sorted(runs, key=lambda x: x[0])]) for hf, runs in by_hf.items()}


def _tensors(ck: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(our name, shape) of every model tensor in a DCP checkpoint, from its metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(str(ck)).read_metadata()
    return [(k[len("model.") :], tuple(v.size)) for k, v in md.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(v, TensorStorageMetadata)]  # fmt: skip


def _read(ck: Path, name: str, size: tuple[int, ...]) -> torch.Tensor:
    import warnings

    import torch.distributed.checkpoint as dcp

    t = torch.empty(size, dtype=torch.float32)
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": {name: t}}, storage_reader=dcp.FileSystemReader(str(ck)), no_dist=True)
    return t


def export(ck: Path, flat: dict[str, Any], out: Path, run_dir: Path, dtype: str = "bf16",
           max_shard_bytes: int = 2 << 30) -> dict[str, Any]:  # fmt: skip
    """Write the Hugging Face folder ``out`` from checkpoint ``ck`` of run ``run_dir``; returns a summary."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: {sorted(DTYPES)}")
    shape = model_shape(flat)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    shards: list[dict[str, str]] = []  # per shard: hf name -> temporary file name
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            tmp = f"shard-{len(shards):05d}.tmp"
            save_file(buf, str(out / tmp), metadata={"format": "pt"})
            shards.append(dict.fromkeys(buf, tmp))
            buf, size = {}, 0

    for name, tsize in _tensors(ck):
        for hf, t in split(name, _read(ck, name, tsize), shape).items():
            t = t.to(DTYPES[dtype]).contiguous()
            if size and size + t.numel() * t.element_size() > max_shard_bytes:
                flush()
            buf[hf] = t
            size += t.numel() * t.element_size()
            total += t.numel() * t.element_size()
    flush()
    weight_map = {}
    for i, shard in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / next(iter(shard.values())), out / final)
        weight_map.update(dict.fromkeys(shard, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    base_path = run_dir / RUN_HF_CONFIG
    base = json.loads(base_path.read_text()) if base_path.is_file() else None
    cfg = to_hf_config(shape, base, default_max_positions=int(flat.get("data.max_len") or 0))
    cfg["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = run_dir / RUN_TOKENIZER
    copied = []
    if tok.is_dir():
        for f in sorted(tok.iterdir()):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return {"checkpoint": str(ck), "out": str(out), "shards": len(shards), "bytes": total, "dtype": dtype,
            "tensors": len(weight_map), "tokenizer_files": copied}  # fmt: skip
