"""The spawn harness itself: results come back, a raising rank surfaces, a hang is killed fast."""

import time

import pytest

from tests.dist import RankError, run_distributed


def _allreduce(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_one(rank, world):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def _hang(rank, world):
    import torch.distributed as dist

    if rank == 0:
        time.sleep(300)
    dist.barrier()


def test_collective_returns_every_rank():
    assert run_distributed(_allreduce, 3, timeout=60) == [6.0, 6.0, 6.0]


def test_failing_rank_reraises_its_traceback():
    with pytest.raises(RankError, match="boom on rank one"):
        run_distributed(_raise_on_one, 2, timeout=60)


@pytest.mark.slow  # waits out a timeout
def test_hang_is_killed_after_timeout():
    start = time.monotonic()
    with pytest.raises((TimeoutError, RankError)):
        run_distributed(_hang, 2, timeout=8, collective_timeout=60)
    assert time.monotonic() - start < 30
