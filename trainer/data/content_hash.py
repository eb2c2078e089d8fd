"""A hash of the bytes of every file a data source reads, so a resume (and ``sp-eval``) sees changed data even
when every document keeps its length.

Each file is streamed once through xxh3-128 and the digest cached under its real path, keyed by size,
modification time and change time (ns): a later start re-reads only files that changed. The cache is a JSON
file in ``$SP_CACHE_DIR`` (default ``$XDG_CACHE_HOME/sp-train``, else ``~/.cache/sp-train``); it is written
atomically, and one that cannot be read or written only costs a re-hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

CHUNK = 8 << 20  # bytes read per update


def cache_file() -> Path:
    root = os.environ.get("SP_CACHE_DIR") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                                 / "sp-train")  # fmt: skip
    return Path(root) / "content_hashes.json"


def _load(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save(path: Path, cache: dict) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".content_hashes.")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)  # atomic: ranks writing at once leave one whole file


def file_digest(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def content_hash(files: list[str]) -> str:
    """xxh3-128 over (name, digest) of each file, in order; digests from the cache where a file is unchanged."""
    import xxhash

    where = cache_file()
    cache, changed = _load(where), False
    total = xxhash.xxh3_128()
    for name in files:
        st = os.stat(name)
        key, stamp = os.path.realpath(name), [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("xxh3_128"), str):
            digest = entry["xxh3_128"]
        else:
            digest = file_digest(name)
            cache[key], changed = {"stamp": stamp, "xxh3_128": digest}, True
        total.update(f"{Path(name).name}\0{digest}\0".encode())
    if changed:
        _save(where, cache)
    return total.hexdigest()
