"""Checkpoints that cannot silently corrupt a run, written synchronously or in the background.

Layout: ``<out_dir>/checkpoints/step_NNNNNN/`` holds the model and optimizer through
torch.distributed.checkpoint (sharded under FSDP), ``extra.pt`` (step, loader position, RNG: plain tensors and
numbers, loaded with ``weights_only=True``), ``config.json`` (the resolved job), ``data.json`` (the training
data's fingerprint) and ``MANIFEST.json`` (a checksum and size of every other file, see
:mod:`trainer.integrity`). A checkpoint is written into ``step_NNNNNN.tmp``; every rank hashes the files it
wrote, rank 0 merges the entries into the manifest, then the folder is renamed into place and only then does
``latest`` move (atomically). A resume verifies the newest checkpoint with every rank checking its share of
the files; one that fails (missing manifest, a missing, resized or changed file) is skipped with a warning
naming the file, and the newest intact one is used instead.

Asynchronous saves (``train.async_checkpoint``): torch DCP's ``async_save`` stages a copy of the state in
host memory (the step loop then goes on; the run's one stager reuses its host buffers, pinned on CUDA) and
writes it from a background thread over a gloo group of its own; the hashing, the manifest, the rename and
``latest`` follow in that thread only after the write has completed. One save is in flight at a time: the next
save, a stop request and the end of the run wait for it.

Trust: DCP metadata is pickled, so a checkpoint must come from a trusted source, like any pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer import integrity

MANIFEST = integrity.MANIFEST
DATA = "data.json"
STATS = "save_stats.json"  # in checkpoints/: the last completed save's timings (the preemption budget reads it)


def write_manifest(folder: Path) -> None:
    """Single process: hash every file of ``folder`` and write its manifest."""
    integrity.write(folder, {})


def verify(folder: Path) -> str | None:
    """Single process: None when the checkpoint is intact, else what is wrong (naming the file)."""
    return integrity.verify(folder)


class Saver:
    """Writes a run's checkpoints; ``asynchronous`` selects DCP's async save (collective to construct)."""

    def __init__(self, out_dir: str, asynchronous: bool = False) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.asynchronous = asynchronous
        self.group = dist.new_group(backend="gloo") if asynchronous else None  # async_save needs a CPU backend
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if asynchronous else None
        self.stager = _stager() if asynchronous else None  # kept across saves: its host buffers are reused
        self._pending: Future | None = None
        self.last: dict[str, float] = {}  # rank-local timings of the last completed save
        self.context: dict[str, float] = {}  # recorded beside the timings (the trainer's slowest step)

    def save(self, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any],
             config: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
             during: Callable[[], None] | None = None) -> str:  # fmt: skip
        """Collective. Returns the checkpoint folder (being written, when asynchronous). ``during`` runs
        after the tensors are written and before the manifest (the test hook for a stop mid-write)."""
        self.wait()
        t0 = time.perf_counter()
        final, tmp = self.root / f"step_{step:06d}", self.root / f"step_{step:06d}.tmp"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
            tmp.mkdir(parents=True)
        dist.barrier()
        msd, osd = get_state_dict(model, optim)
        small = {**extra, "step": step, "rng": torch.get_rng_state()}  # captured now, written by rank 0 later
        job = (tmp, final, small, config or {}, data, during, t0)
        if self._exec is None:
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
            self._finish(None, *job)
        else:
            fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), process_group=self.group,
                                 async_stager=self.stager)  # fmt: skip
            assert isinstance(fut, Future)  # the default stager stages synchronously (no AsyncSaveResponse)
            self.last = {"blocking_s": time.perf_counter() - t0}  # staging: the step loop's share of the save
            self._pending = self._exec.submit(self._finish, fut, *job)
        return str(final)

    def _finish(self, fut: Future | None, tmp: Path, final: Path, small: dict[str, Any], config: dict[str, Any],
                data: dict[str, Any] | None, during: Callable[[], None] | None, t0: float) -> None:  # fmt: skip
        if fut is not None:
            fut.result()
        written = time.perf_counter()
        if during is not None:
            during()
        rank = dist.get_rank(self.group)
        if rank == 0:
            torch.save(small, tmp / "extra.pt")
            (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
            if data is not None:
                (tmp / DATA).write_text(json.dumps(data, indent=1, sort_keys=True))
        mine = integrity.entries(tmp, integrity.rank_files(tmp, dist.get_rank()), dist.get_rank())
        hashed = time.perf_counter()
        parts: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, mine, group=self.group)
        if rank == 0:
            merged = {k: v for p in parts for k, v in p.items()}
            integrity.write(tmp, merged)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            marker = self.root / "latest.tmp"
            marker.write_text(final.name)
            os.replace(marker, self.root / "latest")
        dist.barrier(group=self.group)
        done = time.perf_counter()
        self.last = {**self.last, "write_s": written - t0, "hash_s": hashed - written,
                     "manifest_s": done - written, "total_s": done - t0}  # fmt: skip
        if fut is None:
            self.last["blocking_s"] = self.last["total_s"]
        if rank == 0:
            stats = {**self.last, **self.context, "step": small["step"]}
            (self.root / (STATS + ".tmp")).write_text(json.dumps(stats))
            os.replace(self.root / (STATS + ".tmp"), self.root / STATS)

    @property
    def in_flight(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is complete; re-raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._exec is not None:
            self._exec.shutdown(wait=True)
        if self.stager is not None:
            self.stager.close()
            self.stager = None


def _stager() -> Any:
    """DCP's stager, made once per run: it caches one host copy per state storage, so every save after the first
    copies into the same buffers (pinned on CUDA, copied non-blocking) instead of fresh pageable memory (what
    ``async_save`` does when it makes its own stager per save). Staging stays synchronous: the step loop goes on
    once the copy is in host memory."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=cuda))  # fmt: skip


def save(out_dir: str, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any],
         config: dict[str, Any] | None = None) -> str:  # fmt: skip
    """Collective, synchronous. Returns the checkpoint folder."""
    return Saver(out_dir).save(step, model, optim, extra, config)


def candidates(out_dir: str) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)


def newest_intact(out_dir: str, collective: bool = False) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose manifest verifies, and a warning for every newer one that does not.
    ``collective``: every rank verifies its share of the files (rank 0's listing and manifest are used)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    box: list[Any] = [candidates(out_dir)]
    if collective:
        dist.broadcast_object_list(box, src=0)
    warnings: list[str] = []
    for folder in box[0]:
        files: list[Any] = [integrity.read(folder) if rank == 0 else None]
        if collective:
            dist.broadcast_object_list(files, src=0)
        problem = files[0] if isinstance(files[0], str) else integrity.check(folder, files[0], rank, world)
        if collective:
            found: list[Any] = [None] * world
            dist.all_gather_object(found, problem)
            problem = next((p for p in found if p is not None), None)
        if problem is None:
            return folder, warnings
        warnings.append(f"skipping checkpoint {folder.name}: {problem}")
    return None, warnings


def latest(out_dir: str) -> Path | None:
    return newest_intact(out_dir)[0]


def stored_config(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    return json.loads(f.read_text()) if f.exists() else {}


def stored_data(path: Path) -> dict[str, Any] | None:
    f = path / DATA
    return json.loads(f.read_text()) if f.exists() else None


def save_stats(out_dir: str) -> dict[str, float] | None:
    f = Path(out_dir) / "checkpoints" / STATS
    return json.loads(f.read_text()) if f.exists() else None


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
