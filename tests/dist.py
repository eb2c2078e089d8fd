"""The tests' spawn harness (kept in the library as :mod:`sp.spawn` so benchmarks and sp-profile share it), and
a GroupPool prepared with the fixed layouts the tests run."""

from __future__ import annotations

from typing import Any

from sp.spawn import RankError, run_distributed

__all__ = ["RankError", "prepared_pool", "run_distributed"]


def prepared_pool(world: int, extra: tuple[tuple[tuple[int, ...], int], ...] = ()) -> Any:
    """A GroupPool (call on every rank) holding every prefix range ``0..n-1`` and every aligned power-of-two
    range of the world, each with every Ulysses degree dividing its size, plus ``extra`` groups ``(ranks, u)``."""
    import sp

    groups = [(tuple(range(n)), u) for n in range(2, world + 1) for u in range(1, n + 1) if n % u == 0]
    size = 2
    while size <= world:
        groups += [(tuple(range(b, b + size)), u) for b in range(0, world - size + 1, size)
                   for u in range(1, size + 1) if size % u == 0]  # fmt: skip
        size *= 2
    pool = sp.GroupPool(max_per_rank=10_000)
    pool.prepare([*groups, *extra])
    return pool
