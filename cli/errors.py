"""One message per error, not one per rank.

Errors found before the ranks connect (the config) are the same on every rank: rank 0 prints them. An error
raised after they connect may be one rank's own: each failing rank posts its message in the process group's
store, and a rank other than 0 prints it only when rank 0 has not posted the same message within
``WAIT_S`` (rank 0 failing the same way is the common case; a rank failing alone still gets heard).
"""

from __future__ import annotations

import sys
from datetime import timedelta

WAIT_S = 10.0  # how long a failing rank > 0 waits for rank 0's message before printing its own


def report(prog: str, error: BaseException, rank: int) -> None:
    """Print ``prog: error: <error>`` on stderr once for the job (see the module docstring)."""
    msg = str(error)
    if not _heard_from_rank0(msg, rank):
        where = f" (rank {rank})" if rank else ""
        print(f"{prog}: error{where}: {msg}", file=sys.stderr, flush=True)


def _heard_from_rank0(msg: str, rank: int) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"sp_error/{rank}", msg)
        if rank == 0:
            return False
        store.wait(["sp_error/0"], timedelta(seconds=WAIT_S))
        return bool(store.get("sp_error/0").decode() == msg)
    except Exception:  # noqa: BLE001 - no store, or rank 0 never posted: print our own
        return False
