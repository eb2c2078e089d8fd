"""Start-up cost of the data fingerprint's content hash: a source of ``gb`` GB hashed once (the first start
after the data changed) and again from the cache (every later start). The file is written just before, so
the first hash reads from the page cache: on a cold disk add the read time at the disk's bandwidth."""

from __future__ import annotations

import os
import time
from pathlib import Path


def run(gb: float, workdir: str) -> list[dict]:
    from trainer.data import content_hash as ch

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    os.environ["SP_CACHE_DIR"] = str(root / "cache")
    ch.cache_file().unlink(missing_ok=True)
    data = root / "source.bin"
    block = os.urandom(ch.CHUNK)
    with open(data, "wb") as f:
        for _ in range(max(1, int(gb * 1e9) // ch.CHUNK)):
            f.write(block)
    size = data.stat().st_size
    rows = []
    for phase in ("first start (hash the bytes)", "later start (cached by size and times)"):
        t0 = time.perf_counter()
        digest = ch.content_hash([str(data)])
        s = time.perf_counter() - t0
        rows.append({"bench": "content_hash", "phase": phase, "bytes": size, "seconds": round(s, 4),
                     "gb_per_s": round(size / s / 1e9, 2), "digest": digest})  # fmt: skip
    data.unlink()
    return rows
