"""The per-micro-step MILP, solved with HiGHS.

For a target makespan T, decide how many groups of each candidate shape to build (``n_k``, integer) and how
many sequences of each length bucket each shape runs (``x_bk``, integer), such that:

    find x, n (no objective: the first feasible point ends the solve)
    s.t. sum_k P_k n_k <= N                                   the groups fit the cluster
         sum_k x_bk = c_b                                    every sequence assigned once
         sum_b tbar_bk x_bk <= (T - beta) n_k                 shape k's work fits in its n_k groups by T
         sum_b Lmax_b x_bk <= C_k n_k                         memory: tokens fit the groups' capacity
         x_bk = 0 where tmax_bk > T - beta or Lmax_b > C_k/1  a sequence is never split across groups
         n_k <= N / P_k,  x, n integer

T is feasible when such a point exists (leftover GPUs join as extra groups). The planner searches
T between the fluid lower bound and the greedy plan (bisection), packs each feasible solution into concrete
groups, and keeps the best packed plan. Fixing T makes the model linear (``n_k * T`` would be bilinear).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import highspy
import numpy as np


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS prints a banner to fd 1 on construction even with output off; keep JSON output clean."""
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class MilpResult:
    feasible: bool
    gpus: int
    n: np.ndarray  # [K] groups per shape
    x: np.ndarray  # [B, K] sequences per (bucket, shape)
    dual_bound: float


def solve_counts(
    counts: np.ndarray,  # [B] sequences per bucket
    tbar: np.ndarray,  # [B, K] mean seconds of a bucket's sequence on shape k
    tmax: np.ndarray,  # [B, K] max seconds of a bucket's sequence on shape k
    lmax: np.ndarray,  # [B] longest sequence of the bucket (tokens)
    sizes: np.ndarray,  # [K] GPUs per group of shape k
    capacity: np.ndarray,  # [K] tokens one group of shape k holds
    world: int,
    budget_s: float,
    time_limit_s: float,
) -> MilpResult:
    b_n, k_n = tbar.shape
    allowed = (tmax <= budget_s) & (lmax[:, None] <= capacity[None, :])
    if not allowed.any(axis=1).all():
        return MilpResult(False, 0, np.zeros(k_n), np.zeros((b_n, k_n)), float("inf"))
    bi, ki = np.nonzero(allowed)
    nx = len(bi)
    ncol = nx + k_n
    # columns: x (allowed pairs) then n_k; rows: B assignment, K time, K memory
    rows, cols, vals = [], [], []
    for c, (b, k) in enumerate(zip(bi, ki)):
        rows += [b, b_n + k, b_n + k_n + k]
        cols += [c, c, c]
        vals += [1.0, float(tbar[b, k]), float(lmax[b])]
    for k in range(k_n):
        rows += [b_n + k, b_n + k_n + k, b_n + 2 * k_n]
        cols += [nx + k, nx + k, nx + k]
        vals += [-budget_s, -float(capacity[k]), float(sizes[k])]
    order = np.lexsort((np.array(rows), np.array(cols)))
    rows_a, cols_a, vals_a = np.array(rows)[order], np.array(cols)[order], np.array(vals)[order]
    lp = highspy.HighsLp()
    lp.num_col_ = ncol
    lp.num_row_ = b_n + 2 * k_n + 1
    lp.col_cost_ = np.zeros(ncol)  # pure feasibility: HiGHS stops at the first plan that fits
    lp.col_lower_ = np.zeros(ncol)
    lp.col_upper_ = np.concatenate([counts[bi].astype(float), (world // sizes).astype(float)])
    lp.row_lower_ = np.concatenate([counts.astype(float), np.full(2 * k_n + 1, -highspy.kHighsInf)])
    lp.row_upper_ = np.concatenate([counts.astype(float), np.zeros(2 * k_n), [float(world)]])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.searchsorted(cols_a, np.arange(ncol + 1)).astype(np.int32)
    lp.a_matrix_.index_ = rows_a.astype(np.int32)
    lp.a_matrix_.value_ = vals_a
    lp.integrality_ = [highspy.HighsVarType.kInteger] * ncol
    with _quiet_stdout():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("mip_rel_gap", 1e-4)
    h.setOptionValue("threads", 1)
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    dual = float(info.mip_dual_bound) if info.mip_dual_bound == info.mip_dual_bound else 0.0
    if status not in (highspy.HighsModelStatus.kOptimal,) and info.primal_solution_status != 2:
        return MilpResult(False, 0, np.zeros(k_n), np.zeros((b_n, k_n)), dual)
    sol = np.round(np.asarray(h.getSolution().col_value)).astype(np.int64)
    x = np.zeros((b_n, k_n), dtype=np.int64)
    x[bi, ki] = sol[:nx]
    n = sol[nx:]
    gpus = int((n * sizes).sum())
    return MilpResult(gpus <= world, gpus, n, x, dual)
