"""Span timers for the runtime: how long attention (with its communication) and its communication waits take.

The trainer hands a :class:`SpanTimer` to :meth:`sp.groups.GroupPool.context`; the attention forward and backward
record ``attention`` spans and every wait on an all-to-all or a ring transfer a ``comm_wait`` span inside them.
On CUDA a span is a pair of CUDA events (no synchronisation inside the step: read :meth:`SpanTimer.totals` after
the caller's own device synchronise); a host-side wait there only enqueues a stream dependency, so
``comm_wait`` is not separable on CUDA and stays 0. On the CPU both are host wall-clock time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

ATTENTION = "attention"
COMM_WAIT = "comm_wait"


class SpanTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Device time on CUDA (events), wall-clock time on the CPU."""
        if not self.cuda:
            with self.host_span(name):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._events.append((name, start, end))

    @contextlib.contextmanager
    def host_span(self, name: str) -> Iterator[None]:
        """Host wall-clock time (a blocking wait); nothing on CUDA, where the host does not block."""
        if self.cuda:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host[name] = self._host.get(name, 0.0) + time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        """Seconds per span name (after the device is synchronised on CUDA)."""
        out = dict(self._host)
        for name, start, end in self._events:
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        return out


def waiting(timer: SpanTimer | None) -> contextlib.AbstractContextManager:
    """A ``comm_wait`` span, or nothing without a timer."""
    return timer.host_span(COMM_WAIT) if timer is not None else contextlib.nullcontext()


def timing(timer: SpanTimer | None) -> contextlib.AbstractContextManager:
    """An ``attention`` span, or nothing without a timer."""
    return timer.span(ATTENTION) if timer is not None else contextlib.nullcontext()
