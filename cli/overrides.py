"""Command-line overrides checked against the schema before Hydra sees them: an unknown key or config option is
one error that names the closest valid ones ("did you mean train.steps?"), printed by rank 0 only.

Hydra's own message for ``train.step=10`` is "To append to your config use +train.step=10", once per rank, and
following it gives a different error (:func:`cli.hydra_app.check_declared` refuses undeclared keys). Schema
groups registered for Hydra (``cluster_schema``, ...) are not options a user may select.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # torchrun, srun, Open MPI, MPICH


def is_rank0() -> bool:
    """Whether this process prints launch errors: rank 0 under any launcher, or a process launched alone."""
    return all(os.environ.get(v, "0") == "0" for v in RANK_VARS)


def options(config_dir: str, group: str) -> list[str]:
    """The configs a user may select for ``group``: the YAML files of ``config_dir/<group>`` (the schemas
    registered for Hydra are not among them)."""
    return sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))


def _near(word: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)" if close else ""


def _fields(schema: Any) -> dict[str, Any]:
    """Field name -> the schema (a dataclass type) of its node, or None for a leaf."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        node = None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            made = f.default_factory()  # type: ignore[misc]
            node = type(made) if dataclasses.is_dataclass(made) else None
        elif isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            node = f.type
        out[f.name] = node
    return out


def check(args: list[str], root: Any, config_dir: str, groups: tuple[str, ...]) -> None:
    """Raise ValueError for the first override of ``args`` whose key is not in ``root`` (the job's schema, a
    dataclass type) or whose group option is not a file of ``config_dir/<group>``. Appends (``+``), deletions
    (``~``), Hydra's own keys and flags are left to Hydra."""
    top = _fields(root)
    for arg in args:
        if arg.startswith(("+", "~", "-", "hydra.", "hydra/")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        parts = key.split(".")
        if len(parts) == 1 and key in groups:
            valid = options(config_dir, key)
            if value not in valid:
                raise ValueError(f"{key}={value} is not a {key} config{_near(value, valid)}; valid: "
                                 f"{', '.join(valid)} (configs/{key}/*.yaml)")  # fmt: skip
            continue
        schema: dict[str, Any] | None = top
        path = ""
        for i, part in enumerate(parts):
            if schema is None:  # a leaf or a free-form node (model.rope_scaling, data.sources): Hydra checks it
                break
            if part not in schema:
                where = path.rstrip(".") or "the config"
                valid = sorted(schema)
                raise ValueError(f"unknown config key {key!r}{_near(part, valid, path)}; valid keys of {where}: "
                                 f"{', '.join(valid)}")  # fmt: skip
            node = schema[part]
            schema = _fields(node) if node is not None and i + 1 < len(parts) else None
            path += part + "."
