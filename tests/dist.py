"""The tests' spawn harness (kept in the library as :mod:`sp.spawn` so benchmarks and sp-profile share it)."""

from sp.spawn import RankError, run_distributed

__all__ = ["RankError", "run_distributed"]
