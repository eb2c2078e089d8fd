"""Fluid lower bound on a micro-step's makespan.

Relax the plan so that a group's work may spread over any number of groups of its shape, keeping only that a
sequence runs whole on one group. A makespan T is then reachable only if every sequence has a shape it fits
(memory, and ``t_sk <= T - beta``) and the cheapest GPU-time of all sequences fits the cluster:

    sum_s min_{k feasible at T} P_k t_sk <= N (T - beta).

The left side falls and the right side grows with T, so bisection finds the smallest such T. Every real plan
satisfies this inequality, so the result is a valid lower bound (it is the LP relaxation's optimum of the
exact, unbucketed assignment problem) and ``gap = (planned - bound) / planned`` is an upper bound on the
true optimality gap.
"""

from __future__ import annotations

import numpy as np


def fluid_bound(tmat: np.ndarray, sizes: np.ndarray, fits: np.ndarray, world: int, beta: float) -> float:
    """tmat [S, K] seconds, sizes [K] GPUs, fits [S, K] memory-feasible -> lower bound (seconds)."""
    gpu_time = np.where(fits, tmat * sizes[None, :], np.inf)
    t = np.where(fits, tmat, np.inf)

    def ok(budget: float) -> bool:
        cheapest = np.where(t <= budget, gpu_time, np.inf).min(axis=1)
        return bool(np.isfinite(cheapest).all() and cheapest.sum() <= world * budget * (1 + 1e-12))

    lo = float(t.min(axis=1).max())  # the longest sequence on its fastest shape
    if ok(lo):
        return beta + lo
    hi = float(gpu_time.min(axis=1).sum())
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        if hi - lo <= 1e-9 * hi:
            break
    return beta + hi
