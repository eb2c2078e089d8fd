"""Spawn harness: run a function on N gloo ranks in separate processes, with a hard timeout.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes (``spawn``), joins them
into one gloo world through a ``FileStore`` (no port races), calls ``fn(rank, world_size, *args)`` on each
and returns the list of per-rank results. A rank that raises makes the call raise ``RankError`` carrying
that rank's traceback; a run that outlives ``timeout`` kills every rank and raises ``TimeoutError``.

Starting a rank costs ~2.5 s of torch import: spawn once (per test module, benchmark or profile run) and run
many cases inside. ``fn`` must be importable (a module-level function). ``preload`` names modules a
``forkserver`` imports once per calling process; every later call's ranks fork from it instead of importing
them afresh (the test suite's many worlds), and still get the caller's environment of the moment.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def _worker(fn, rank, world_size, store_path, args, results, collective_timeout, env):  # pragma: no cover
    if env is not None:  # forked from a forkserver started earlier: the caller's environment of now, as spawn gives
        os.environ.clear()
        os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle: torch's queue pickler would pass tensors as shared-memory handles that die with us
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    collective_timeout: float | None = None,
    preload: tuple[str, ...] = (),
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx: Any = mp.get_context("forkserver" if preload else "spawn")
    if preload:
        ctx.set_forkserver_preload(list(preload))  # takes effect when this process's forkserver starts
    env = dict(os.environ) if preload else None
    results: Any = ctx.Queue()
    coll_timeout = collective_timeout if collective_timeout is not None else max(timeout - 5.0, 5.0)
    with tempfile.TemporaryDirectory(prefix="spdist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, r, world_size, store_path, args, results, coll_timeout, env),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(out) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (killed)")
                try:
                    rank, ok, value = results.get(timeout=min(left, 0.5))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                    if dead:
                        raise RankError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                    continue
                if not ok:
                    raise RankError(f"rank {rank} raised:\n{value}")
                out[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=2.0)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [out[r] for r in range(world_size)]
