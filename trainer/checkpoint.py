"""Checkpoints with torch.distributed.checkpoint: model and optimizer through DCP, the rest (step,
scheduler, loader position, RNG) in ``extra.pt`` written by rank 0. ``latest`` names the newest one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def save(out_dir: str, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any]) -> str:
    path = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        torch.save({**extra, "step": step, "rng": torch.get_rng_state()}, path / "extra.pt")
        tmp = path.parent / "latest.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, path.parent / "latest")
    dist.barrier()
    return str(path)


def latest(out_dir: str) -> Path | None:
    marker = Path(out_dir) / "checkpoints" / "latest"
    return marker.parent / marker.read_text().strip() if marker.exists() else None


def load(path: Path, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    state: dict[str, Any] = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra: dict[str, Any] = torch.load(path / "extra.pt", weights_only=False)
    torch.set_rng_state(extra["rng"])
    return extra
