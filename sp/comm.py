"""Point-to-point ring exchange: send to the next ring rank, receive from the previous one.

``batch_isend_irecv`` posts both sides at once (a separate blocking send and recv would deadlock when every
rank sends first). The returned :class:`Exchange` is waited on later, so the transfer runs under compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sp.timing import SpanTimer, waiting


@dataclass
class Exchange:
    works: list
    recv: torch.Tensor
    timer: SpanTimer | None = None  # the wait is a comm_wait span (sp.timing)

    def wait(self) -> torch.Tensor:
        with waiting(self.timer):
            for w in self.works:
                w.wait()
        return self.recv


def ring_exchange(
    t: torch.Tensor,
    ring_ranks: tuple[int, ...],
    ring_rank: int,
    group: dist.ProcessGroup | None,
    tag: int = 0,
    timer: SpanTimer | None = None,
) -> Exchange:
    """Post ``t -> ring_ranks[ring_rank + 1]`` and ``recv <- ring_ranks[ring_rank - 1]``; return the handle."""
    r = len(ring_ranks)
    send = t.contiguous()
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.isend, send, ring_ranks[(ring_rank + 1) % r], group, tag),
        dist.P2POp(dist.irecv, recv, ring_ranks[(ring_rank - 1) % r], group, tag),
    ]
    return Exchange(dist.batch_isend_irecv(ops), recv, timer)


def bytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
