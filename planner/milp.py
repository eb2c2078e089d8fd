"""The per-micro-step MILP, solved with HiGHS.

For a target makespan T, decide how many groups of each candidate shape to build (``n_k``, integer) and how
many sequences of each length bucket each shape runs (``x_bk``, integer), such that:

    find x, n (no objective: the first feasible point ends the solve)
    s.t. sum_k P_k n_k <= N                                   the groups fit the cluster (and, where the group
                                                               sizes need it, the nodes: see ``placement``)
         sum_k x_bk = c_b                                    every sequence assigned once
         sum_b tbar_bk x_bk <= (T - beta_k) n_k               shape k's work fits in its n_k groups by T
         sum_b Lmax_b x_bk <= C_k n_k                         memory: tokens fit the groups' capacity
         x_bk = 0 where tmax_bk > T - beta_k or Lmax_b > C_k  a sequence is never split across groups
         n_k <= groups of size P_k that fit,  x, n integer

(beta_k: shape k's fixed cost per group, CostModel.group_overhead_s). T is feasible when such a point exists
(leftover GPUs join as extra groups). ``placement`` (:meth:`planner.topology.Topology.node_rows`) adds one
integer column per node filling and the rows that make the groups' sizes packable into the nodes. Small
micro-steps use the exact model instead (:func:`solve_instances`: one binary per (sequence, group instance)),
for which infeasibility at T proves that no plan reaches T. The planner searches T between the fluid lower
bound and the greedy plan (bisection), packs each feasible solution into concrete groups, and keeps the best
packed plan. Fixing T makes the model linear (``n_k * T`` would be bilinear).
"""

from __future__ import annotations

import contextlib
import logging
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


INFEASIBLE = np.zeros(0, dtype=np.int64)  # sentinel: the solver proved that no point exists


WATCHDOG_GRACE_S = 1.0  # a solve may overrun its time limit by this much (CPU starvation too) before abandoned
_log = logging.getLogger("planner")


def _solve(
    cols: int, rows: list[int], colidx: list[int], vals: list[float], row_lo, row_hi, col_hi, time_limit_s: float
) -> np.ndarray | None:
    """Solve the all-integer feasibility problem ``row_lo <= A x <= row_hi, 0 <= x <= col_hi``: a point,
    ``INFEASIBLE`` when proven impossible, or None when the time limit came first."""
    order = np.lexsort((np.array(rows), np.array(colidx)))
    r_a, c_a, v_a = np.array(rows)[order], np.array(colidx)[order], np.array(vals, dtype=float)[order]
    lp = highspy.HighsLp()
    lp.num_col_ = cols
    lp.num_row_ = len(row_lo)
    lp.col_cost_ = np.zeros(cols)  # pure feasibility: HiGHS stops at the first plan that fits
    lp.col_lower_ = np.zeros(cols)
    lp.col_upper_ = np.asarray(col_hi, dtype=float)
    lp.row_lower_ = np.asarray(row_lo, dtype=float)
    lp.row_upper_ = np.asarray(row_hi, dtype=float)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.searchsorted(c_a, np.arange(cols + 1)).astype(np.int32)
    lp.a_matrix_.index_ = r_a.astype(np.int32)
    lp.a_matrix_.value_ = v_a
    lp.integrality_ = [highspy.HighsVarType.kInteger] * cols
    return solve_lp(lp, time_limit_s)


def solve_lp(lp: highspy.HighsLp, time_limit_s: float, presolve: str = "off") -> np.ndarray | None:
    """Solve an all-integer model under a hard wall-clock bound: a point, ``INFEASIBLE``, or None (time out).

    HiGHS 1.16's presolve can loop forever on small models while ignoring ``time_limit``, so presolve is off
    (it buys nothing on models of this size). As a second line of defence the solve runs in HiGHS's own
    solver thread (the GIL is released) and is abandoned, with a logged warning, when it overruns its limit
    by :data:`WATCHDOG_GRACE_S`: the caller then keeps the plan it has (the greedy one at worst). An abandoned
    solve keeps its daemon thread busy until it ends or the process exits.
    """
    with _quiet_stdout():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("threads", 1)
    h.setOptionValue("presolve", presolve)
    h.passModel(lp)
    h.startSolve()
    done, _ = h.wait(float(time_limit_s) + WATCHDOG_GRACE_S)
    if not done:
        h.cancelSolve()
        _log.warning(
            "HiGHS overran its %.3f s time limit by %.2f s (%d rows, %d columns): solve abandoned, "
            "keeping the best plan found so far",
            time_limit_s, WATCHDOG_GRACE_S, lp.num_row_, lp.num_col_,
        )  # fmt: skip
        return None
    if h.getModelStatus() == highspy.HighsModelStatus.kInfeasible:
        return INFEASIBLE
    if h.getInfo().primal_solution_status != 2:  # 2 = feasible point found
        return None
    return np.round(np.asarray(h.getSolution().col_value)).astype(np.int64)


def proven_infeasible(result: object) -> bool:
    return result is INFEASIBLE


INF = highspy.kHighsInf
Placement = tuple[np.ndarray, np.ndarray, np.ndarray] | None  # Topology.node_rows: A [R, K], B [R, P], hi [R]


def _placement(
    placement: Placement, group_cols: list[tuple[int, int]], first_row: int, first_col: int, nodes: int
) -> tuple[list[int], list[int], list[float], np.ndarray, np.ndarray]:
    """The node rows over group columns ``(column, shape k)`` and pattern columns from ``first_col``:
    (rows, cols, vals, row_hi [R], pattern col_hi [P]); nothing when ``placement`` is None."""
    if placement is None:
        return [], [], [], np.zeros(0), np.zeros(0)
    a, b, hi = placement
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for col, k in group_cols:
        for r in np.nonzero(a[:, k])[0].tolist():
            rows.append(first_row + r)
            cols.append(col)
            vals.append(float(a[r, k]))
    for p in range(b.shape[1]):
        for r in np.nonzero(b[:, p])[0].tolist():
            rows.append(first_row + r)
            cols.append(first_col + p)
            vals.append(float(b[r, p]))
    return rows, cols, vals, hi, np.full(b.shape[1], float(nodes))


def solve_patterns(patterns: np.ndarray, demand: np.ndarray, nodes: int, time_limit_s: float = 1.0):
    """Nodes per filling ``y [P]`` with ``patterns.T y >= demand`` and ``sum y <= nodes``: a point,
    ``INFEASIBLE``, or None (time out). Places groups where first fit fails (planner.topology)."""
    p_n, s_n = patterns.shape
    rows, cols, vals = [], [], []
    for p in range(p_n):
        for s in np.nonzero(patterns[p])[0].tolist():
            rows.append(s)
            cols.append(p)
            vals.append(float(patterns[p, s]))
        rows.append(s_n)
        cols.append(p)
        vals.append(1.0)
    row_lo = np.concatenate([demand, [-INF]])
    row_hi = np.concatenate([np.full(s_n, INF), [nodes]])
    return _solve(p_n, rows, cols, vals, row_lo, row_hi, np.full(p_n, float(nodes)), time_limit_s)


def solve_counts(
    counts: np.ndarray,  # [B] sequences per bucket
    tbar: np.ndarray,  # [B, K] mean seconds of a bucket's sequence on shape k
    tmax: np.ndarray,  # [B, K] max seconds of a bucket's sequence on shape k
    lmax: np.ndarray,  # [B] longest sequence of the bucket (tokens)
    sizes: np.ndarray,  # [K] GPUs per group of shape k
    capacity: np.ndarray,  # [K] tokens one group of shape k holds
    world: int,
    budget_s: np.ndarray,  # [K] T minus each shape's fixed overhead
    time_limit_s: float,
    placement: Placement = None,
    nodes: int = 1,
    max_groups: np.ndarray | None = None,  # [K] groups of each shape that fit at once (default N / P_k)
) -> MilpResult:
    """Aggregated model: ``n_k`` groups per shape share shape k's work (see the module docstring)."""
    b_n, k_n = tbar.shape
    allowed = (tmax <= budget_s[None, :]) & (lmax[:, None] <= capacity[None, :])
    empty = MilpResult(False, 0, np.zeros(k_n), np.zeros((b_n, k_n)), 0.0)
    if not allowed.any(axis=1).all():
        return empty
    bi, ki = np.nonzero(allowed)
    nx = len(bi)
    # columns: x (allowed pairs) then n_k; rows: B assignment, K time, K memory, 1 GPU count
    rows, cols, vals = [], [], []
    for c, (b, k) in enumerate(zip(bi.tolist(), ki.tolist())):
        rows += [b, b_n + k, b_n + k_n + k]
        cols += [c, c, c]
        vals += [1.0, float(tbar[b, k]), float(lmax[b])]
    for k in range(k_n):  # noqa: B007 - k indexes rows and columns
        rows += [b_n + k, b_n + k_n + k, b_n + 2 * k_n]
        cols += [nx + k] * 3
        vals += [-float(budget_s[k]), -float(capacity[k]), float(sizes[k])]
    n_rows = b_n + 2 * k_n + 1
    pr, pc, pv, p_hi, y_hi = _placement(placement, [(nx + k, k) for k in range(k_n)], n_rows, nx + k_n, nodes)
    rows, cols, vals = rows + pr, cols + pc, vals + pv
    row_lo = np.concatenate([counts, np.full(2 * k_n + 1 + len(p_hi), -INF)])
    row_hi = np.concatenate([counts, np.zeros(2 * k_n), [world], p_hi])
    col_hi = np.concatenate([counts[bi], world // sizes if max_groups is None else max_groups, y_hi])
    sol = _solve(nx + k_n + len(y_hi), rows, cols, vals, row_lo, row_hi, col_hi, time_limit_s)
    if sol is None or sol is INFEASIBLE:
        return empty
    x = np.zeros((b_n, k_n), dtype=np.int64)
    x[bi, ki] = sol[:nx]
    n = sol[nx : nx + k_n]
    return MilpResult(True, int((n * sizes).sum()), n, x, 0.0)


def solve_instances(
    lengths: np.ndarray,  # [S] exact lengths
    tmat: np.ndarray,  # [S, K] exact seconds
    sizes: np.ndarray,
    capacity: np.ndarray,
    world: int,
    budget_s: np.ndarray,  # [K]
    time_limit_s: float,
    placement: Placement = None,
    nodes: int = 1,
    max_groups: np.ndarray | None = None,  # [K] groups of each shape that fit at once (default N / P_k)
) -> list[tuple[int, list[int]]] | np.ndarray | None:
    """Exact model for small micro-steps: one binary per candidate group instance, one per (sequence, instance).

    Instances of shape k: ``min(N / P_k, S)``, used in order (``z_ki >= z_k,i+1``, symmetry breaking). Returns
    the groups ``(shape, sequences)`` of a plan whose every group's work is <= ``budget_s``; ``INFEASIBLE``
    when the solver proved there is none; None when it ran out of time.
    """
    s_n, k_n = tmat.shape
    most = world // sizes if max_groups is None else max_groups
    inst = [(k, i) for k in range(k_n) for i in range(min(int(most[k]), s_n))]
    ok = (tmat <= budget_s[None, :]) & (lengths[:, None] <= capacity[None, :])
    if not ok.any(axis=1).all():
        return INFEASIBLE
    pairs = [(s, j) for j, (k, _) in enumerate(inst) for s in range(s_n) if ok[s, k]]
    nz = len(inst)
    rows, cols, vals = [], [], []
    # rows: S assignment | I time | I memory | I link (x <= z) folded into time | 1 GPU count | I-1 symmetry
    for c, (s, j) in enumerate(pairs):
        k = inst[j][0]
        rows += [s, s_n + j, s_n + nz + j]
        cols += [nz + c] * 3
        vals += [1.0, float(tmat[s, k]), float(lengths[s])]
    sym = 0
    for j, (k, i) in enumerate(inst):
        rows += [s_n + j, s_n + nz + j, s_n + 2 * nz]
        cols += [j] * 3
        vals += [-float(budget_s[k]) - 1e-12, -float(capacity[k]), float(sizes[k])]
        if i > 0:
            rows += [s_n + 2 * nz + 1 + sym, s_n + 2 * nz + 1 + sym]
            cols += [j - 1, j]
            vals += [1.0, -1.0]
            sym += 1
    n_rows, n_cols = s_n + 2 * nz + 1 + sym, nz + len(pairs)
    pr, pc, pv, p_hi, y_hi = _placement(placement, [(j, k) for j, (k, _) in enumerate(inst)], n_rows, n_cols, nodes)
    rows, cols, vals = rows + pr, cols + pc, vals + pv
    row_lo = np.concatenate([np.ones(s_n), np.full(2 * nz + 1, -INF), np.zeros(sym), np.full(len(p_hi), -INF)])
    row_hi = np.concatenate([np.ones(s_n), np.zeros(2 * nz), [world], np.full(sym, INF), p_hi])
    col_hi = np.concatenate([np.ones(n_cols), y_hi])
    sol = _solve(n_cols + len(y_hi), rows, cols, vals, row_lo, row_hi, col_hi, time_limit_s)
    if sol is None or sol is INFEASIBLE:
        return sol
    groups: dict[int, list[int]] = {}
    for c, (s, j) in enumerate(pairs):
        if sol[nz + c]:
            groups.setdefault(j, []).append(s)
    return [(inst[j][0], seqs) for j, seqs in groups.items()]
