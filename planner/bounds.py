"""Fluid lower bound on a micro-step's makespan.

Relax the plan so that a group's work may spread over any number of groups of its shape, keeping only that a
sequence runs whole on one group. A makespan T is then reachable only if every sequence has a shape it fits
(memory, and ``t_sk <= T - beta_k``) and the cheapest GPU-time of all sequences fits the cluster:

    sum_s min_{k feasible at T} P_k t_sk <= N (T - min_k beta_k).

The left side falls and the right side grows with T, so bisection finds the smallest such T. Every real plan
satisfies this inequality, so the result is a valid lower bound (it is the LP relaxation's optimum of the
exact, unbucketed assignment problem) and ``gap = (planned - bound) / planned`` is an upper bound on the
true optimality gap.
"""

from __future__ import annotations

import numpy as np


def fluid_bound(tmat: np.ndarray, sizes: np.ndarray, fits: np.ndarray, world: int, beta: np.ndarray) -> float:
    """tmat [S, K] seconds, sizes [K] GPUs, fits [S, K] memory-feasible, beta [K] fixed seconds per group
    -> lower bound (seconds). The cluster's capacity uses the smallest beta, which keeps the bound valid."""
    gpu_time = np.where(fits, tmat * sizes[None, :], np.inf)
    finish = np.where(fits, tmat + beta[None, :], np.inf)  # one sequence alone on shape k
    b0 = float(beta.min())

    def ok(t: float) -> bool:
        cheapest = np.where(finish <= t * (1 + 1e-12), gpu_time, np.inf).min(axis=1)
        return bool(np.isfinite(cheapest).all() and cheapest.sum() <= world * (t - b0) * (1 + 1e-12))

    lo = float(finish.min(axis=1).max())  # the longest sequence on its fastest shape
    if ok(lo):
        return lo
    hi = max(float(finish[np.isfinite(finish)].max()), b0 + float(gpu_time.min(axis=1).sum()) / world)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        if hi - lo <= 1e-9 * hi:
            break
    return hi
