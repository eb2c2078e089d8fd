"""What a checkpoint records of its training data, and the differences a resume refuses.

Per source: its name, kind, path, weight and length bounds, document count, total tokens, a hash of the
size table, a hash of the bytes of every file it reads (:mod:`.content_hash`: edited documents of unchanged
length are caught too), and the trained targets where loss masks exist.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from trainer.data.content_hash import content_hash
from trainer.data.corpus import Corpus


def fingerprint(corpora: list[Corpus]) -> dict:
    import xxhash

    out = []
    for c in corpora:
        s = c.src
        path = str(Path(sysconfig.get_paths()["stdlib"])) if s.source in ("stdlib", "pydoc") else s.path
        sizes = np.ascontiguousarray(c.sizes, dtype=np.int64).tobytes()
        out.append({
            "name": s.name, "source": s.source, "path": path, "weight": s.weight, "min_len": s.min_len,
            "max_len": s.max_len, "documents": len(c), "tokens": int(c.sizes.sum()),
            "sizes_xxh3_128": xxhash.xxh3_128(sizes).hexdigest(),
            **({"content_xxh3_128": content_hash(files)} if (files := c.files()) else {}),
            **({"trained_targets": c.trained} if c.trained is not None else {}),
        })  # fmt: skip
    return {"sources": out}


# added since the first fingerprints (mixtures; content hashes): an older checkpoint lacks them
NEW_FIELDS = ("name", "weight", "min_len", "max_len", "content_xxh3_128")


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Each difference as ``source i (path): field old -> new``; empty when the data is the same. Fields an
    older fingerprint lacks (name, weight, bounds) are not differences."""
    olds, news = old.get("sources", []), new.get("sources", [])
    if len(olds) != len(news):
        return [f"number of sources: {len(olds)} -> {len(news)} ({[s.get('name', s.get('source')) for s in olds]} "
                f"-> {[s.get('name') for s in news]})"]  # fmt: skip
    out = []
    for i, (a, b) in enumerate(zip(olds, news, strict=True)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key) and not (key in NEW_FIELDS and key not in a):
                out.append(f"source {i} ({b.get('name')}, {b.get('path')}): {key} {a.get(key)!r} -> {b.get(key)!r}")
    return out
