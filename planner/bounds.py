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

from collections.abc import Callable
from typing import Any

import numpy as np


def fluid_bound(tmat: np.ndarray, sizes: np.ndarray, fits: np.ndarray, world: int, beta: np.ndarray) -> float:
    """tmat [S, K] seconds, sizes [K] GPUs, fits [S, K] memory-feasible, beta [K] fixed seconds per group
    -> lower bound (seconds), inf when some sequence fits no shape. The cluster's capacity uses the smallest
    beta, which keeps the bound valid."""
    if not fits.any(axis=1).all():
        return float("inf")
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
    return _smallest_ok(ok, lo, hi)


def quick_bound(sub: Any, world: int) -> float:
    """A cheap lower bound on a micro-step's makespan (below :func:`fluid_bound`): the longest sequence alone on
    its fastest shape that holds it, and all sequences' cheapest GPU-time spread over the cluster; inf when a
    sequence fits no shape. Orders and prunes memory modes before the fluid bound is computed."""
    fits = sub.lengths[:, None] <= sub.capacity[None, :]
    if not fits.any(axis=1).all():
        return float("inf")
    b0 = float(sub.beta.min())
    alone = np.where(fits, sub.tmat + sub.beta[None, :], np.inf).min(axis=1).max()
    work = np.where(fits, sub.tmat * sub.sizes[None, :], np.inf).min(axis=1).sum() / world + b0
    return float(max(alone, work))


def _smallest_ok(ok: Callable[[float], bool], lo: float, hi: float) -> float:
    """Bisection for the smallest t in [lo, hi] with ok(t) (ok monotone, ok(hi) true, ok(lo) false)."""
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        if hi - lo <= 1e-9 * hi:
            break
    return hi


def step_bound(
    tmat: np.ndarray, sizes: np.ndarray, fits: np.ndarray, world: int, beta: np.ndarray, lengths: np.ndarray,
    step_capacity: float,
) -> float:  # fmt: skip
    """Lower bound on a whole step's time over *every* micro-step split (any number m of micro-steps, any
    assignment of sequences to them), not only the split the planner chose.

    Notation: f_s = min_k (beta_k + t_sk) over shapes that hold s (its fastest finish), b0 = min_k beta_k,
    C = ``step_capacity`` (tokens one micro-step can hold on the whole cluster), T_j the micro-step times.
    1. Memory forces m >= m0 = ceil(sum L / C), and each micro-step lasts at least b0.
    2. Sort sequences by f, longest first. The k longest need at least n_k = ceil(sum of their L / C) distinct
       micro-steps, so the j-th largest micro-step "top" (its sequence with the largest f) is at least
       f of the first sequence where n_k reaches j: g_j. Hence sum_j T_j >= G = sum_j max(g_j, b0).
    3. Per micro-step, the fluid argument of :func:`fluid_bound`: its groups' GPU-time
       sum_s P_k t_sk <= N (T_j - b0). The micro-step holding s lasts at most T - R, where R lower-bounds the
       other micro-steps' total: R = max(G - max_j g_j, (m0 - 1) b0 + W_rest / N), W_rest being the least
       cheapest-shape work of any token set of sum L - C tokens (the others must hold them; a fractional
       knapsack by work per token). So s uses a shape with beta_k + t_sk <= T - R; summing over
       micro-steps: sum_s w_s(T - R) <= N (T - m0 b0), w_s(x) = s's cheapest GPU-time among shapes finishing
       by x. The left side falls and the right side grows in T: bisection.
    More micro-steps than m0 only raise R and m b0, so m0 is the adversary's best choice; the bound is
    max(G, the smallest T of 3.). Tests check it against brute force over all splits on small instances.
    """
    gpu_time = np.where(fits, tmat * sizes[None, :], np.inf)  # [S, K]
    finish = np.where(fits, tmat + beta[None, :], np.inf)  # [S, K]
    b0 = float(beta.min())
    f = finish.min(axis=1)  # [S]
    m0 = max(1, int(np.ceil(lengths.sum() / step_capacity - 1e-9)))
    order = np.argsort(-f, kind="stable")
    forced = np.ceil(np.cumsum(lengths[order]) / step_capacity - 1e-9)  # [S] micro-steps the k longest need
    g = np.array([f[order][np.argmax(forced >= j)] if forced[-1] >= j else 0.0 for j in range(1, m0 + 1)])
    g = np.maximum(g, b0)  # [m0] nonincreasing
    total_g = float(g.sum())
    # the others hold >= sum L - C tokens: their cheapest work, as a fractional knapsack by work per token
    w_min = gpu_time.min(axis=1)  # [S] cheapest GPU-seconds over every shape that holds the sequence
    by_rate = np.argsort(w_min / lengths, kind="stable")
    need = float(lengths.sum()) - step_capacity
    cum = np.cumsum(lengths[by_rate].astype(float))  # [S]
    k = int(np.searchsorted(cum, need)) if need > 0 else -1
    others_work = 0.0
    if k >= 0:
        done = cum[k - 1] if k > 0 else 0.0
        others_work = float(w_min[by_rate[:k]].sum()) + (need - done) / lengths[by_rate[k]] * w_min[by_rate[k]]
    rest = max(total_g - float(g.max()), (m0 - 1) * b0 + others_work / world)

    def ok(t: float) -> bool:
        cheapest = np.where(finish <= (t - rest) * (1 + 1e-12), gpu_time, np.inf).min(axis=1)
        return bool(np.isfinite(cheapest).all() and cheapest.sum() <= world * (t - m0 * b0) * (1 + 1e-12))

    lo = max(total_g, float(f.max()) + rest)
    if ok(lo):
        return lo
    hi = max(lo, m0 * b0 + float(w_min.sum()) / world, float(finish[np.isfinite(finish)].max()) + rest)
    return _smallest_ok(ok, lo, hi)
