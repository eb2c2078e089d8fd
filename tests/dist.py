"""The tests' spawn harness (kept in the library as :mod:`sp.spawn` so benchmarks and sp-profile share it), and
a GroupPool prepared with the fixed layouts the tests run."""

from __future__ import annotations

from typing import Any

from sp import spawn
from sp.spawn import RankError

__all__ = ["RankError", "prepared_pool", "run_distributed"]

# imported once by the suite's forkserver, so that each rank of each world forks instead of importing them
PRELOAD = ("torch", "torch.distributed", "megatron.core.models.gpt", "trainer.loop", "models.gpt", "sp")


def run_distributed(fn: Any, world_size: int, *args: Any, timeout: float = 60.0,
                    collective_timeout: float | None = None) -> list[Any]:  # fmt: skip
    """:func:`sp.spawn.run_distributed` with ranks forked from a forkserver that has the heavy modules loaded."""
    return spawn.run_distributed(fn, world_size, *args, timeout=timeout, collective_timeout=collective_timeout,
                                 preload=PRELOAD)  # fmt: skip


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
