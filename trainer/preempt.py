"""Stop requests (Slurm's ``--signal``, preemption, ``kill``) caught from the first line of an entry point and
honoured at the next safe point.

- :meth:`Preemption.install` sets the SIGUSR1/SIGTERM handlers. ``cli/train.py`` calls it before it imports
  torch, Hydra or the trainer, so a signal that arrives while the ranks import, build the model, load a
  checkpoint or scan the corpus is recorded instead of killing them (Python's default for SIGUSR1). What
  remains unguarded is the interpreter's own start (tens of milliseconds before the first line runs); the
  sbatch script requeues however the ranks ended, so a signal there costs a restart, never a checkpoint.
- The handler only records the request (async-signal-safe: no I/O, no locks).
- Safe points: between start-up phases (:meth:`Preemption.checkpoint` agrees across ranks and raises
  :class:`StopBeforeStart`, so every rank exits cleanly at the same point and the job requeues); between
  steps (the trainer's per-step stop flag); after a checkpoint write (the write always finishes first).
- Fault injection for tests: ``SP_SIGNAL_AT_PHASE=PHASE[:SIGNAL][@RANK][#N]`` makes a rank (every rank
  without ``@``) send itself a real signal (default USR1) the N-th time (default first) it enters the named
  phase, so each phase's behaviour is tested deterministically.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
FAULT_ENV = "SP_SIGNAL_AT_PHASE"
PHASES = ("start", "init", "build", "load", "data", "step", "save")  # in the order a run meets them


class StopBeforeStart(Exception):
    """Every rank agreed to stop before the first step (a stop request arrived during start-up)."""

    def __init__(self, phase: str, signum: int | None) -> None:
        name = signal.Signals(signum).name if signum else "a stop request"
        super().__init__(f"{name} during start-up (phase {phase!r}): exiting before the first step")
        self.phase = phase


class Preemption:
    """One per process: the stop request and the phase the process is in."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase = "start"
        self._fault = _parse_fault(os.environ.get(FAULT_ENV, ""))

    def install(self) -> Preemption:
        for sig in SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """A stop asked for by the program itself (the launcher died, a test)."""
        if self.signum is None:
            self.signum = signum

    def enter(self, phase: str, rank: int | None = None) -> None:
        """Record the phase; fire the injected fault when it names this phase (and rank)."""
        self.phase = phase
        if self._fault is None:
            return
        want_phase, sig, want_rank, nth = self._fault
        if want_phase != phase or (want_rank is not None and rank is not None and want_rank != rank):
            return
        if nth > 1:
            self._fault = (want_phase, sig, want_rank, nth - 1)
            return
        self._fault = None  # once
        os.kill(os.getpid(), sig)
        if sig in SIGNALS:  # wait (bounded) until the handler has run: the eval loop runs it between bytecodes
            end = time.monotonic() + 5.0
            while self.signum is None and time.monotonic() < end:
                time.sleep(0.001)

    def agreed_signal(self, device: Any = None) -> int | None:
        """Collective: the stop signal any rank received (the largest number when several), None when no rank
        has a stop request."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.signum or 0)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def agreed(self, device: Any = None) -> bool:
        """Collective: True on every rank when any rank has a stop request."""
        return self.agreed_signal(device) is not None

    def checkpoint(self, phase: str, rank: int, device: Any = None) -> None:
        """A start-up safe point (collective): enter ``phase``; raise :class:`StopBeforeStart` when any rank
        has a stop request."""
        self.enter(phase, rank)
        if (signum := self.agreed_signal(device)) is not None:
            raise StopBeforeStart(phase, signum)


def _parse_fault(spec: str) -> tuple[str, int, int | None, int] | None:
    if not spec:
        return None
    nth, rank = 1, None
    if "#" in spec:
        spec, n = spec.split("#", 1)
        nth = int(n)
    if "@" in spec:
        spec, r = spec.split("@", 1)
        rank = int(r)
    phase, _, name = spec.partition(":")
    if phase not in PHASES:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown phase {phase!r}; valid: {list(PHASES)}")
    try:
        sig = signal.Signals["SIG" + (name or "USR1").upper().removeprefix("SIG")]
    except KeyError:
        raise ValueError(f"{FAULT_ENV}: unknown signal {name!r}; valid e.g. USR1, TERM, KILL") from None
    return phase, int(sig), rank, nth


def budget_warning(step_s: float, save_s: float, warning_s: float) -> str | None:
    """What to tell the user when a stop signal's warning cannot cover the slowest step plus a save."""
    need = step_s + save_s
    if need <= warning_s:
        return None
    return (f"preemption budget: the slowest step ({step_s:.1f} s) plus a checkpoint save ({save_s:.1f} s) take "
            f"{need:.1f} s, more than train.preempt_warning_s={warning_s:g} s: a stop signal that early before "
            f"the time limit may not leave time to checkpoint. Ask for at least --signal=B:USR1@{int(need * 1.2) + 10} "
            "in the sbatch script (and set train.preempt_warning_s to match), or save faster "
            "(train.async_checkpoint=true only shortens periodic saves; a stop waits for the write)")  # fmt: skip
