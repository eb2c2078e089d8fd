"""Sequence-length sources for dry runs: a file (.txt[.gz] one per line, .jsonl, .npy) or a fixed list."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

MAX_LENGTH = 2**40  # a sanity bound: no real sequence is a trillion tokens


def read_lengths(path: str) -> np.ndarray:
    """Every row is validated; a bad one is an error naming ``file:line`` (or the .npy's dtype)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"lengths file {path!r} does not exist")
    if p.is_dir():
        raise ValueError(f"lengths file {path!r} is a directory; valid: a .txt[.gz], .jsonl[.gz] or .npy file")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: lengths must be integers, the array holds {arr.dtype}")
        arr = arr.astype(np.int64).ravel()
        bad = np.nonzero((arr < 1) | (arr > MAX_LENGTH))[0]
        if len(bad):
            raise ValueError(f"{path}: element {bad[0]} is {arr[bad[0]]}; valid: 1 <= length <= {MAX_LENGTH}")
    else:
        arr = np.array(_read_rows(p, path), dtype=np.int64)
    if arr.size == 0:
        raise ValueError(f"lengths file {path!r} holds no lengths")
    return arr


def _read_rows(p: Path, path: str) -> list[int]:
    out: list[int] = []
    jsonl = ".jsonl" in p.suffixes
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            for n, line in enumerate(f, 1):
                if line.strip():
                    out.append(_row(line, jsonl, f"{path}:{n}"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read as {'gzip' if p.suffix == '.gz' else 'text'} ({e})") from None
    return out


def _row(line: str, jsonl: bool, where: str) -> int:
    try:
        value = _jsonl_length(json.loads(line)) if jsonl else line.strip()
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise ValueError(f"{where}: {str(value)[:40]!r} is not a whole number of tokens")
    n = int(value)
    if not 1 <= n <= MAX_LENGTH:
        raise ValueError(f"{where}: length {n}; valid: 1 <= length <= {MAX_LENGTH}")
    return n


def _jsonl_length(row: dict | int) -> int | str:
    if isinstance(row, int):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"JSONL row {str(row)[:40]!r} is neither a length nor an object")
    for key in ("length", "len", "num_tokens", "seqlen"):
        if key in row:
            return row[key]  # type: ignore[no-any-return]
    raise ValueError(f"JSONL row has none of the keys length/len/num_tokens/seqlen: {sorted(row)[:6]}")


def split_lengths(pool: np.ndarray, max_len: int) -> np.ndarray:
    """Each length above ``max_len`` becomes the pieces ``sp-train`` (``data.long_docs=split``) trains: full
    pieces of ``max_len`` and the rest (a document of n + 1 tokens has n training tokens)."""
    pool = np.asarray(pool, dtype=np.int64)
    full, rest = pool // max_len, pool % max_len
    pieces = np.repeat(np.full(len(pool), max_len), full)
    return np.concatenate([pieces, rest[rest > 0]])


def sample_steps(
    pool: np.ndarray, global_batch: int, steps: int, max_len: int, seed: int, clip: bool = False
) -> list[np.ndarray]:
    """``steps`` batches of ``global_batch`` lengths drawn from ``pool``. A length above ``max_len`` is an
    error unless ``clip`` (``lengths.clip=true``), which caps them and says how many."""
    if global_batch < 1 or steps < 1 or max_len < 1:
        raise ValueError(f"global_batch, steps and max_len must be >= 1, got {global_batch}, {steps}, {max_len}")
    over = int((pool > max_len).sum())
    if over and not clip:
        raise ValueError(
            f"{over} of {len(pool)} lengths exceed lengths.max_len={max_len} (longest {int(pool.max())}); raise "
            "lengths.max_len, or set lengths.clip=true to cap them at max_len (like a data pipeline's truncation)"
        )
    if over:
        print(f"[sp-plan] lengths.clip=true: {over} of {len(pool)} lengths capped at {max_len}", file=sys.stderr)
    rng = np.random.default_rng(seed)
    return [np.minimum(rng.choice(pool, size=global_batch), max_len) for _ in range(steps)]
