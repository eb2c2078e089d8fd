"""Where every rank is, so that a collective timeout names the phase and the rank that did not arrive.

Before each collective phase of a step (plan broadcast, each micro-step, loss reduction, optimizer step,
stop flag, checkpoint) a rank records ``step|phase|wall time`` under its own key in the process group's
key-value store (one small write; the store is the launcher's rendezvous store, so it outlives a frozen
peer). When a collective times out, gloo and NCCL only say that *something* timed out; :meth:`Heartbeat.watch`
re-raises it as a :class:`CollectiveTimeout` naming this rank's phase and every rank that last reported from
somewhere else, with how long ago. On NCCL, torch's own watchdog may abort the process first
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``); the heartbeat keys then still show, in the store, where each rank was.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

TIMED_OUT = "timed out in: "


class CollectiveTimeout(RuntimeError):
    """A collective timed out; the message says where this rank and the others were."""


def is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


class Heartbeat:
    def __init__(self, rank: int, world: int, store: Any | None = None) -> None:
        self.rank, self.world = rank, world
        self.store = store if store is not None else _default_store()
        self.step, self.phase = -1, "start-up"

    def beat(self, phase: str, step: int | None = None) -> None:
        self.step = self.step if step is None else step
        self.phase = phase
        if self.store is not None:
            self.store.set(f"sp/heartbeat/{self.rank}", f"{self.step}|{phase}|{time.time():.3f}")

    def others(self) -> list[tuple[int, int, str, float]]:
        """(rank, step, phase, seconds since its last report) of every other rank that has reported."""
        out: list[tuple[int, int, str, float]] = []
        if self.store is None:
            return out
        now = time.time()
        for r in range(self.world):
            key = f"sp/heartbeat/{r}"
            if r == self.rank or not self.store.check([key]):
                continue
            step, phase, at = self.store.get(key).decode().split("|", 2)
            out.append((r, int(step), phase, now - float(at)))
        return out

    def explain(self, error: BaseException, grace_s: float = 3.0) -> str:
        """This rank marks itself timed out, waits ``grace_s`` for the ranks blocked in the same collective
        to time out too, then names the ranks that did not: they never reached it (frozen, slow or dead)."""
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        lines = [f"rank {self.rank}: a collective timed out in step {self.step}, phase {self.phase!r} ({first})."]
        if self.store is None:
            return lines[0]
        self.store.set(f"sp/heartbeat/{self.rank}", f"{self.step}|{TIMED_OUT}{self.phase}|{time.time():.3f}")
        time.sleep(grace_s)
        others = self.others()
        late = [o for o in others if not o[2].startswith(TIMED_OUT)]
        silent = sorted(set(range(self.world)) - {self.rank} - {o[0] for o in others})
        if late or silent:
            lines.append("Ranks that did not reach it (frozen, slow or dead):")
            lines += [f"  rank {r}: step {s}, phase {p!r}, last report {age:.0f} s ago" for r, s, p, age in late]
            lines += [f"  rank {r}: never reported" for r in silent]
        else:
            lines.append("Every rank timed out in a collective: a slow collective (raise train.collective_timeout_s).")
        return "\n".join(lines)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Re-raise a timed-out collective inside the block as a :class:`CollectiveTimeout`."""
        try:
            yield
        except CollectiveTimeout:
            raise
        except RuntimeError as e:
            if is_timeout(e):
                raise CollectiveTimeout(self.explain(e)) from e
            raise


def _default_store() -> Any | None:
    """The default process group's store (a private torch API: without it, messages name no ranks)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None
