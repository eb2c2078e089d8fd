"""Measured FSDP2 traffic: the bytes its all-gathers and reduce-scatters move.

:class:`FsdpTraffic` wraps ``torch.distributed.all_gather_single`` and ``reduce_scatter_single`` (what FSDP2's
collectives call) while its context is open and adds up each call's unsharded buffer: the all-gather's output,
the reduce-scatter's input. :meth:`planner.cost.CostModel.fsdp_collective_bytes` predicts the same per
micro-step (``sp-bench memory --fsdp`` and a test compare them to the byte). Any other caller of these two
functions inside the context is counted too: open it around one pass only.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


class FsdpTraffic:
    def __init__(self) -> None:
        self.all_gather = 0
        self.reduce_scatter = 0
        self.calls = 0
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> FsdpTraffic:
        gather, scatter = dist.all_gather_single, dist.reduce_scatter_single
        self._saved = (gather, scatter)
        meter = self

        def all_gather_single(output: Any, *args: Any, **kwargs: Any) -> Any:
            meter.all_gather += output.numel() * output.element_size()
            meter.calls += 1
            return gather(output, *args, **kwargs)

        def reduce_scatter_single(*args: Any, **kwargs: Any) -> Any:
            buf = kwargs["input"] if "input" in kwargs else args[1]  # (output, input, ...)
            meter.reduce_scatter += buf.numel() * buf.element_size()
            meter.calls += 1
            return scatter(*args, **kwargs)

        dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        dist.all_gather_single, dist.reduce_scatter_single = self._saved  # type: ignore[assignment]
