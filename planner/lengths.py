"""Sequence-length sources for dry runs: a file (.txt[.gz] one per line, .jsonl, .npy) or a fixed list."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np


def read_lengths(path: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"lengths file {path!r} does not exist")
    if p.suffix == ".npy":
        arr = np.load(p)
    else:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt") as f:  # type: ignore[operator]
            if ".jsonl" in p.suffixes:
                arr = np.array([_jsonl_length(json.loads(line)) for line in f if line.strip()])
            else:
                arr = np.array([int(line) for line in f if line.strip()])
    arr = np.asarray(arr, dtype=np.int64).ravel()
    if arr.size == 0:
        raise ValueError(f"lengths file {path!r} holds no lengths")
    return arr


def _jsonl_length(row: dict | int) -> int:
    if isinstance(row, int):
        return row
    for key in ("length", "len", "num_tokens", "seqlen"):
        if key in row:
            return int(row[key])
    raise ValueError(f"JSONL row has none of the keys length/len/num_tokens/seqlen: {sorted(row)[:6]}")


def sample_steps(pool: np.ndarray, global_batch: int, steps: int, max_len: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of ``global_batch`` lengths drawn from ``pool``, each truncated to ``max_len``."""
    if global_batch < 1 or steps < 1 or max_len < 1:
        raise ValueError(f"global_batch, steps and max_len must be >= 1, got {global_batch}, {steps}, {max_len}")
    rng = np.random.default_rng(seed)
    return [np.minimum(rng.choice(pool, size=global_batch), max_len) for _ in range(steps)]
