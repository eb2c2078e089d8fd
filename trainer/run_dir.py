"""One run per folder: an exclusive lock, a config check on resume, and a COMPLETE marker that says whose.

- **Lock.** Rank 0 holds ``flock(LOCK_EX)`` on ``<out_dir>/.lock`` while it trains; a second run on the same
  folder fails at once, naming the holder's pid. The kernel drops the lock when the process dies, so a lock
  left by a crashed run never blocks the next one.
- **Resume.** The resolved job config is stored with every checkpoint. Resuming compares it with the new
  one: differences in :data:`SAFE_TO_CHANGE` (step count, logging, timeouts, planner search effort, the
  cluster description) are listed and accepted; any other difference (model, data, optimizer, strategy,
  sharding, seed, ...) stops the run with the list, since it would silently continue a different run.
- **COMPLETE.** Written when the last step is done, as JSON with the run's config hash and step count; a
  stale marker is removed when a run starts, and a stop for requeue never writes one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

SAFE_TO_CHANGE = (
    "train.steps", "train.log_every", "train.picture_every", "train.checkpoint_every", "train.progress",
    "train.memory_every", "train.plan_timeout_s", "train.collective_timeout_s", "train.max_bad_steps",
    "train.max_skipped_share",
    "train.out_dir", "train.resume", "train.bucket_mb", "train.async_checkpoint", "train.preempt_warning_s",
    "eval.every", "eval.max_docs", "eval.tokens_per_step",
    "planner.", "cluster.",
)  # fmt: skip


def flat_config(job: Any) -> dict[str, Any]:
    """``{"model.layers": 2, ...}`` from the frozen job dataclass (JSON types only)."""
    out: dict[str, Any] = {}
    for section, value in dataclasses.asdict(job).items():
        for key, v in value.items():
            out[f"{section}.{key}"] = list(v) if isinstance(v, tuple) else v
    return json.loads(json.dumps(out, default=str))


def job_from_flat(flat: dict[str, Any]) -> Any:
    """The :class:`trainer.loop.TrainJob` of a stored flat config (the inverse of :func:`flat_config`; a
    section or key the stored config lacks keeps its default)."""
    import typing

    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from trainer.config import DataConfig, EvalConfig, TrainConfig
    from trainer.loop import TrainJob

    sections: dict[str, dict[str, Any]] = {}
    for key, v in flat.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = v

    def build(cls: Any, values: dict[str, Any]) -> Any:
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                v = values[f.name]
                kw[f.name] = tuple(v) if typing.get_origin(hints[f.name]) is tuple and isinstance(v, list) else v
        return cls(**kw)

    classes = {"model": ModelShape, "cluster": Cluster, "planner": PlannerConfig, "data": DataConfig,
               "train": TrainConfig, "eval": EvalConfig}  # fmt: skip
    return TrainJob(**{name: build(cls, sections.get(name, {})) for name, cls in classes.items()})


def config_hash(cfg: dict[str, Any]) -> str:
    keep = {k: v for k, v in cfg.items() if not _safe(k)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(safe, refused) differences, each as ``key: old -> new``."""
    safe: list[str] = []
    refused: list[str] = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines = _named_items(key, old.get(key), new.get(key)) or [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"]
            (safe if _safe(key) else refused).extend(lines)
    return safe, refused


def _named_items(key: str, old: Any, new: Any) -> list[str]:
    """Lists of named entries (``data.sources``) field by field: ``data.sources[code].weight: 0.6 -> 0.5``."""
    named = lambda v: isinstance(v, list) and all(isinstance(e, dict) and "name" in e for e in v)  # noqa: E731
    if not (named(old) and named(new)):
        return []
    a, b = {e["name"]: e for e in old}, {e["name"]: e for e in new}
    out = [f"{key}[{n}]: removed" for n in a if n not in b] + [f"{key}[{n}]: added" for n in b if n not in a]
    for n in a.keys() & b.keys():
        out += [f"{key}[{n}].{f}: {a[n].get(f)!r} -> {b[n].get(f)!r}" for f in sorted(set(a[n]) | set(b[n]))
                if a[n].get(f) != b[n].get(f)]  # fmt: skip
    if not out and [e["name"] for e in old] != [e["name"] for e in new]:
        out.append(f"{key}: order {[e['name'] for e in old]} -> {[e['name'] for e in new]}")
    return sorted(out)


def resume_check(out: Path, name: str, stored: dict[str, Any], config: dict[str, Any], stored_data: dict | None,
                 data: dict) -> list[str]:  # fmt: skip
    """Whether a run may continue from checkpoint ``name``: raises ValueError listing the config or data
    differences that would silently continue another run; returns what to log (accepted changes, warnings)."""
    from trainer.data.fingerprint import fingerprint_changes

    with contextlib.suppress(TypeError, ValueError):  # a key added since the checkpoint counts as its default
        stored = {**flat_config(job_from_flat(stored)), **stored}
    safe, refused = config_changes(stored, config)
    if refused:
        raise ValueError(
            f"train.out_dir={str(out)!r} holds a run with a different config ({name}); resuming "
            "(train.resume=true, the default) would silently continue it. Differences:\n  " + "\n  ".join(refused)
            + "\nUse a new train.out_dir, or train.resume=false with an empty folder."
        )  # fmt: skip
    notes = []
    if stored_data is None:
        notes.append(f"WARNING: {name} has no data fingerprint (an earlier version wrote it): the training data "
                     "is not checked on this resume")  # fmt: skip
    elif diffs := fingerprint_changes(stored_data, data):
        raise ValueError(
            f"train.out_dir={str(out)!r} holds a run trained on other data ({name}); resuming would silently "
            "continue it on different documents. Differences:\n  " + "\n  ".join(diffs)
            + "\nUse a new train.out_dir (train.init_from=RUN_DIR starts a new stage from its weights)."
        )  # fmt: skip
    if safe:
        notes.append("resuming with changed settings: " + "; ".join(safe))
    return notes


class RunLock:
    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / ".lock"
        self._file: IO[str] | None = open(self.path, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise RuntimeError(
                f"train.out_dir={str(out_dir)!r} is in use by another run (pid {holder}); two runs in one folder "
                "would interleave checkpoints: use another train.out_dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def write_complete(out_dir: Path, step: int, cfg: dict[str, Any]) -> None:
    body = {"step": step, "target_steps": cfg.get("train.steps"), "config_hash": config_hash(cfg)}
    tmp = out_dir / "COMPLETE.tmp"
    tmp.write_text(json.dumps(body) + "\n")
    os.replace(tmp, out_dir / "COMPLETE")
