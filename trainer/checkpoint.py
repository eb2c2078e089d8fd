"""Checkpoints that cannot silently corrupt a run.

Layout: ``<out_dir>/checkpoints/step_NNNNNN/`` holds the model and optimizer through
torch.distributed.checkpoint (sharded under FSDP), ``extra.pt`` (step, loader position, RNG: plain tensors and
numbers, loaded with ``weights_only=True``), ``config.json`` (the resolved job) and ``MANIFEST.json`` (sha256
and size of every other file). A checkpoint is written into ``step_NNNNNN.tmp``, the manifest last, then the
folder is renamed into place and only then does ``latest`` move (atomically). On load the manifest is
verified; a checkpoint that fails (missing manifest, a missing, resized or changed file) is skipped with a
warning naming the file, and the newest intact one is used instead.

Trust: DCP metadata is pickled, so a checkpoint must come from a trusted source, like any pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    body = {str(p.relative_to(folder)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong (naming the file)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return f"{manifest} is missing (the checkpoint was not finished)"
    for name, want in json.loads(manifest.read_text()).items():
        path = folder / name
        if not path.exists():
            return f"{path} is missing"
        if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            return f"{path} does not match its checksum in {manifest}"
    return None


def save(
    out_dir: str,
    step: int,
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    extra: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> str:
    """Collective. Returns the checkpoint folder."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shard is on disk
    if dist.get_rank() == 0:
        torch.save({**extra, "step": step, "rng": torch.get_rng_state()}, tmp / "extra.pt")
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=1, sort_keys=True))
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = root / "latest.tmp"
        marker.write_text(final.name)
        os.replace(marker, root / "latest")
    dist.barrier()
    return str(final)


def newest_intact(out_dir: str) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose manifest verifies, and a warning for every newer one that does not."""
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return None, []
    folders = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    warnings: list[str] = []
    for folder in folders:
        problem = verify(folder)
        if problem is None:
            return folder, warnings
        warnings.append(f"skipping checkpoint {folder.name}: {problem}")
    return None, warnings


def latest(out_dir: str) -> Path | None:
    return newest_intact(out_dir)[0]


def stored_config(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    return json.loads(f.read_text()) if f.exists() else {}


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """The model's weights alone (no optimiser state, step or data position): each rank reads its shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def load(path: Path, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    state: dict[str, Any] = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra: dict[str, Any] = torch.load(path / "extra.pt", weights_only=True)  # plain data: no code runs
    torch.set_rng_state(extra["rng"])
    return extra
