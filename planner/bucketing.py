"""Length buckets: so that 10^4 sequences do not mean 10^4 integer variables per shape."""

from __future__ import annotations

import numpy as np


def bucketize(lengths: np.ndarray, max_buckets: int = 24) -> np.ndarray:
    """Bucket id per sequence: exact lengths when there are few, else geometric (equal log-width) buckets
    over the occupied range, empty buckets dropped. Ids are 0..B-1, ascending in length."""
    uniq = np.unique(lengths)
    if len(uniq) <= max_buckets:
        return np.searchsorted(uniq, lengths)
    logs = np.log(lengths.astype(float))
    edges = np.linspace(logs.min(), logs.max(), max_buckets + 1)[1:-1]
    raw = np.searchsorted(edges, logs, side="right")
    _, ids = np.unique(raw, return_inverse=True)
    return ids
