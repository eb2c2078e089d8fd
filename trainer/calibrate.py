"""Online calibration in the trainer (rank 0): every step's measured times join a sliding window, and every
``planner.recalibrate_every`` steps :func:`planner.fit.fit` re-fits the cost model's time constants on it.
An accepted fit replaces the planner's cost model for the following steps and is written to the run folder's
``calibration.json`` (:mod:`planner.calibration`); a rejected one is logged with its reason.

``SP_CALIBRATION_SLOWDOWN=STRATEGY:FACTOR`` (e.g. ``ring:3``) makes the calibration see that strategy's
attention as FACTOR times slower than measured: a synthetic cluster for tests (the training itself is unchanged).
"""

from __future__ import annotations

import os
import platform
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from planner import calibration
from planner.cost import CostModel
from planner.fit import FitResult, StepTiming, constants, fit, slowed, step_timing
from planner.planner import PlannerConfig
from planner.types import StepPlan

SLOWDOWN_ENV = "SP_CALIBRATION_SLOWDOWN"
STRATEGIES = ("none", "ulysses", "ring", "hybrid")


def slowdown_from_env() -> tuple[str, float] | None:
    spec = os.environ.get(SLOWDOWN_ENV)
    if not spec:
        return None
    name, _, factor = spec.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = -1.0
    if name not in STRATEGIES or not value > 0:
        raise ValueError(f"{SLOWDOWN_ENV}={spec!r}; valid: STRATEGY:FACTOR with STRATEGY in {STRATEGIES}, "
                         "FACTOR > 0 (e.g. ring:3)")  # fmt: skip
    return name, value


def hardware(device: Any, world: int, cluster: str) -> dict[str, Any]:
    """Where the times were measured."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {"device": name, "world": world, "cluster": cluster, "torch": torch.__version__, "host": platform.node()}


class OnlineCalibrator:
    def __init__(self, cost: CostModel, config: PlannerConfig, out: Path, hw: dict[str, Any]) -> None:
        self.cost = self.anchor = cost  # the anchor: the run's starting constants bound every fit
        self.every = config.recalibrate_every
        self.window: deque[StepTiming] = deque(maxlen=config.recalibrate_window)
        self.errors: deque[float] = deque(maxlen=10)
        self.out = out
        self.hw = hw
        self.slowdown = slowdown_from_env()
        self.history: list[FitResult] = []  # every fit attempt of this run, in order

    def record(self, step: int, plan: StepPlan, busy: np.ndarray, attention: np.ndarray, step_s: float) -> float:
        """Add a step (``busy``/``attention``: ``[world, micro-steps]`` seconds); its relative prediction error."""
        t = step_timing(step, plan, busy, attention, step_s)
        if self.slowdown is not None:
            t = slowed(t, *self.slowdown)
        self.window.append(t)
        err = abs(self.predicted_s(plan) - t.time_s) / t.time_s if t.time_s > 0 else 0.0
        self.errors.append(err)
        return err

    def predicted_s(self, plan: StepPlan) -> float:
        """The step time the current model promises for ``plan`` (its micro-steps plus the step overhead)."""
        return plan.time_s + self.cost.step_overhead_s

    def due(self, step: int) -> bool:
        return bool(self.every) and (step + 1) % self.every == 0

    def refit(self, step: int) -> FitResult:
        """Fit on the window; an accepted fit becomes :attr:`cost` and the run folder's calibration file."""
        res = fit(self.cost, list(self.window), anchor=self.anchor)
        self.history.append(res)
        if res.accepted:
            self.cost = res.cost
            self.errors.clear()  # the running error restarts with the new constants
            calibration.write(self.out / "calibration.json", constants(res.cost), res.cost.model, self.hw,
                              fitted_at_step=step + 1, window={"fit_steps": list(res.fit_steps),
                              "held_out_steps": list(res.held_out_steps), "steps": len(self.window)},
                              error_before=res.error_before, error_after=res.error_after,
                              factors=res.factors)  # fmt: skip
        return res

    def running_error(self) -> float:
        return float(np.median(self.errors)) if self.errors else float("nan")

    def scalars(self) -> dict[str, float]:
        """TensorBoard: the current constants."""
        c = constants(self.cost)
        out = {f"calib/{k}": float(c[k]) for k in ("alpha1_ms", "alpha2_ms", "beta_ms", "step_ms", "ring_overlap",
                                                   "intra_latency_us")}  # fmt: skip
        for key in ("a2a_gbs", "p2p_gbs"):
            out |= {f"calib/{key}_{n}": float(v) for n, v in c[key].items()}
        return out


def log_line(step: int, res: FitResult) -> str:
    b, a = res.error_before, res.error_after
    if not res.accepted:
        return f"[sp-train] step {step + 1}: recalibration rejected ({res.reason}); keeping the current constants"
    c = res.cost.cluster
    bws = ", ".join(f"{s}[{n}]={v:.3g}" for s, table in (("a2a", c.a2a_gbs), ("p2p", c.p2p_gbs))
                    for n, v in sorted(table.items()))  # fmt: skip
    return (f"[sp-train] step {step + 1}: recalibrated on steps {res.fit_steps[0] + 1}-{res.fit_steps[-1] + 1}: "
            f"held-out step error median {b['median']:.1%} -> {a['median']:.1%} (p90 {b['p90']:.1%} -> "
            f"{a['p90']:.1%}); alpha1 {c.alpha1_ms:.3g} ms, alpha2 {c.alpha2_ms:.3g} ms, beta {c.beta_ms:.3g} ms, "
            f"step {c.step_ms:.3g} ms, ring overlap {c.ring_overlap:.2f}, GB/s {bws or '-'}")  # fmt: skip
