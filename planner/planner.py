"""The per-step planner: micro-step split, fluid bound, greedy warm start, MILP search, packing.

``Planner(cost).plan(lengths)`` returns a :class:`~planner.types.StepPlan`. For each micro-step:

1. time every sequence on every candidate shape (``tmat``), drop shapes that are never a sequence's fastest
   in their size;
2. the fluid lower bound (:mod:`planner.bounds`) and a greedy plan (fluid sizing + longest-first list
   scheduling + local search) bracket the optimum;
3. bisection on the target makespan T: each probe solves the MILP of :mod:`planner.milp` (shape counts and
   bucket assignment), packs it into groups, runs local search, and keeps the best plan;
4. stop at ``gap_tol`` between the best plan and the search's lower end, at ``max_probes``, or at the time
   limit. The reported bound is the fluid bound (valid for the exact problem).

Small micro-steps (``exact_max_pairs``) skip pruning and use the exact instance model instead of 3.: every
infeasible probe then proves its T unreachable, so the bound rises to meet the plan (optimal up to ``gap_tol``).

A batch whose tokens do not fit the cluster's memory at once is split into the fewest micro-steps that fit
(:func:`planner.microsteps.split`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from planner.bounds import fluid_bound
from planner.bucketing import bucketize
from planner.candidates import STRATEGIES, candidate_shapes
from planner.cost import CostModel
from planner.microsteps import check_lengths, split
from planner.milp import proven_infeasible, solve_counts, solve_instances
from planner.packing import (
    Bin,
    Instance,
    add,
    identical_schedule,
    improve,
    list_schedule,
    makespan,
    to_micro_step,
)
from planner.types import GroupShape, MicroStep, StepPlan


@dataclass(frozen=True, kw_only=True)
class PlannerConfig:
    time_limit_s: float = 2.0  # per micro-step, whole search
    milp_time_limit_s: float = 0.5  # per MILP probe
    gap_tol: float = 0.01
    max_probes: int = 8
    max_buckets: int = 24
    strategies: tuple[str, ...] = STRATEGIES
    use_milp: bool = True
    exact_max_pairs: int = 1500  # micro-steps with at most this many (sequence, group instance) pairs solve exactly


class Planner:
    def __init__(
        self, cost: CostModel, config: PlannerConfig | None = None, shapes: list[GroupShape] | None = None
    ) -> None:
        self.cost = cost
        self.config = config or PlannerConfig()
        self.world = cost.cluster.world
        self.shapes = shapes or candidate_shapes(cost.model, self.world, self.config.strategies)
        self.method = "milp" if self.config.use_milp else "greedy"

    # ---- public ----
    def plan(self, lengths: list[int] | np.ndarray) -> StepPlan:
        t0 = time.perf_counter()
        arr = check_lengths(lengths, self.cost, self.shapes)
        micro = split(
            arr,
            self.cost,
            self.instance(arr).cheapest_work(),
            lambda ids: self.plan_micro(arr, ids, search=False),
            lambda ms: sum(m.time_s for m in ms),
            (lambda ids: self.plan_micro(arr, ids)) if self.config.use_milp else None,
        )
        return StepPlan(tuple(int(x) for x in arr), tuple(micro), time.perf_counter() - t0, self.method)

    def instance(self, lengths: np.ndarray, shapes: list[GroupShape] | None = None) -> Instance:
        shapes = shapes or self.shapes
        tmat = np.stack([np.asarray(self.cost.seq_time_s(lengths.astype(float), sh)) for sh in shapes], axis=1)
        sizes = np.array([sh.size for sh in shapes])
        cap = np.array([self.cost.tokens_capacity(sh.size) for sh in shapes])
        beta = np.array([self.cost.group_overhead_s(sh) for sh in shapes])
        return Instance(lengths, tmat, tuple(shapes), sizes, cap, beta, self.world)

    def plan_micro(self, all_lengths: np.ndarray, ids: np.ndarray, search: bool = True) -> MicroStep | None:
        """Plan one micro-step over sequences ``ids``; None when it cannot fit in memory. ``search=False``
        stops after the greedy plan (used to choose between micro-step splits)."""
        deadline = time.perf_counter() + self.config.time_limit_s
        full = self.instance(all_lengths[ids])
        if full.lengths.sum() > full.capacity.max() / full.sizes.max() * self.world:
            return None
        fits = full.lengths[:, None] <= full.capacity[None, :]
        bound = fluid_bound(full.tmat, full.sizes.astype(float), fits, self.world, full.beta)  # over all shapes
        exact = self._exact_size(full) <= self.config.exact_max_pairs
        inst = full if exact else self._pruned(full)
        best = self._greedy(inst, bound)
        search = search or best is None  # the greedy found nothing: only the search can tell if it fits
        if search and self.config.use_milp and exact:
            best, bound = self._search_exact(inst, bound, best, deadline)
        elif search and self.config.use_milp:
            best = self._search(inst, bound, best, deadline)
        plan = to_micro_step(inst, best, ids, self.cost, bound) if best is not None else None
        static = self._best_static(full, ids, bound)
        if static is not None and (plan is None or static.time_s < plan.time_s):
            return static
        return plan

    def _best_static(self, full: Instance, ids: np.ndarray, bound: float) -> MicroStep | None:
        """The best single-shape layout (N / P identical groups, longest-first) of this micro-step: a static
        layout is a heterogeneous plan too, so the planner never returns anything slower on the same split."""
        best, best_t = None, math.inf
        seqs = list(range(len(full.lengths)))
        for k, size in enumerate(full.sizes.tolist()):
            if self.world % size:
                continue
            bins = identical_schedule(full, k, self.world // size, seqs)
            if bins is not None and makespan(full, bins) < best_t:
                best, best_t = bins, makespan(full, bins)
        return to_micro_step(full, best, ids, self.cost, bound) if best is not None else None

    def _exact_size(self, inst: Instance) -> int:
        n = len(inst.lengths)
        return n * sum(min(self.world // int(p), n) for p in inst.sizes)

    def _search_exact(
        self, inst: Instance, bound: float, best: list[Bin] | None, deadline: float
    ) -> tuple[list[Bin] | None, float]:
        """Bisection on T with the exact instance model: an infeasible probe proves a better bound."""
        best_t = makespan(inst, best) if best is not None else math.inf
        lo, hi = bound, best_t if math.isfinite(best_t) else bound * 4
        for _ in range(self.config.max_probes * 3):
            if hi - lo <= self.config.gap_tol * hi + 1e-12 * hi or time.perf_counter() > deadline:
                break
            target = 0.5 * (lo + hi)
            left = max(1e-3, min(self.config.milp_time_limit_s, deadline - time.perf_counter()))
            res = solve_instances(
                inst.lengths, inst.tmat, inst.sizes, inst.capacity, self.world, target - inst.beta, left
            )
            if res is None:
                break  # out of time: keep what we have
            if proven_infeasible(res):
                lo = target
                continue
            bins = [Bin(k) for k, _ in res]
            for b, (_, seqs) in zip(bins, res):
                for s in seqs:
                    add(inst, b, s)
            hi = makespan(inst, bins)
            if hi < best_t:
                best, best_t = bins, hi
        return best, max(bound, lo)

    # ---- steps ----
    def _pruned(self, inst: Instance) -> Instance:
        """Keep, per size, the shapes that are some sequence's fastest of that size."""
        keep = []
        for size in sorted(set(inst.sizes.tolist())):
            ks = np.nonzero(inst.sizes == size)[0]
            winners = set(ks[np.argmin(inst.tmat[:, ks], axis=1)].tolist())
            keep.extend(sorted(winners))
        keep_a = np.array(keep)
        return Instance(
            inst.lengths,
            inst.tmat[:, keep_a],
            tuple(inst.shapes[k] for k in keep),
            inst.sizes[keep_a],
            inst.capacity[keep_a],
            inst.beta[keep_a],
            inst.world,
        )

    def _greedy(self, inst: Instance, bound: float) -> list[Bin] | None:
        """Fluid sizing, then longest-first list scheduling and local search.

        At a target T each sequence takes its cheapest-GPU-time shape that finishes by T; a shape with work W
        gets ``max(1, round(W / (T - beta)))`` groups. T starts at the bound and grows 5% at a time until the
        groups fit the cluster (a larger T lets sequences take smaller shapes and fewer groups)."""
        fits_mem = inst.lengths[:, None] <= inst.capacity[None, :]
        target = bound
        for _ in range(200):
            budget = np.maximum(target - inst.beta, 1e-12)  # [K]
            ok = fits_mem & (inst.tmat <= budget[None, :] * (1 + 1e-9))
            gpu_time = np.where(ok, inst.tmat * inst.sizes[None, :], np.inf)
            choice = np.argmin(gpu_time, axis=1)
            load = np.bincount(choice, weights=inst.tmat[np.arange(len(choice)), choice], minlength=len(inst.sizes))
            n = np.where(load > 0, np.maximum(1, np.round(load / budget)), 0).astype(int)
            if (n * inst.sizes).sum() <= self.world:
                break
            target *= 1.05
        else:
            return None
        bins = [Bin(int(k)) for k in range(len(n)) for _ in range(n[k])]
        bins += self._fill(inst, n, load)
        if not list_schedule(inst, bins, list(range(len(inst.lengths)))):
            return None
        improve(inst, bins)
        return bins

    def _fill(self, inst: Instance, n: np.ndarray, load: np.ndarray) -> list[Bin]:
        """Extra groups on the GPUs the counts ``n`` leave free: one more group of the used shape whose groups
        are busiest (``load / n``) while one fits, else the fastest shape of the largest size that fits."""
        n = n.astype(float).copy()
        free = self.world - int((n * inst.sizes).sum())
        extra: list[Bin] = []
        while free > 0:
            used = np.nonzero((load > 0) & (inst.sizes <= free))[0]
            if len(used):
                k = int(used[np.argmax(load[used] / np.maximum(n[used], 1))])
            else:
                ks = np.nonzero(inst.sizes <= free)[0]
                if len(ks) == 0:
                    break
                ks = ks[inst.sizes[ks] == inst.sizes[ks].max()]
                k = int(ks[np.argmin(inst.tmat[:, ks].mean(axis=0))])
            extra.append(Bin(k))
            n[k] += 1
            free -= int(inst.sizes[k])
        return extra

    def _search(self, inst: Instance, bound: float, best: list[Bin] | None, deadline: float) -> list[Bin] | None:
        buckets = bucketize(inst.lengths, self.config.max_buckets)
        nb = int(buckets.max()) + 1
        counts = np.bincount(buckets, minlength=nb).astype(float)
        tbar = np.stack(
            [np.bincount(buckets, weights=inst.tmat[:, k], minlength=nb) for k in range(len(inst.sizes))], 1
        )
        tbar = np.asarray(tbar, dtype=float) / counts[:, None]
        tmax = np.full_like(tbar, 0.0)
        np.maximum.at(tmax, buckets, inst.tmat)
        lmax = np.zeros(nb)
        np.maximum.at(lmax, buckets, inst.lengths.astype(float))
        best_t = makespan(inst, best) if best is not None else math.inf
        lo, hi = bound, best_t if math.isfinite(best_t) else bound * 4
        for probe in range(self.config.max_probes):
            if hi - lo <= self.config.gap_tol * hi or time.perf_counter() > deadline:
                break
            target = lo + (hi - lo) * (0.25 if probe == 0 else 0.5)
            left = max(1e-3, min(self.config.milp_time_limit_s, deadline - time.perf_counter()))
            res = solve_counts(
                counts, tbar, tmax, lmax, inst.sizes, inst.capacity, self.world, target - inst.beta, left
            )
            if not res.feasible:
                lo = target
                continue
            hi = target
            bins = self._realise(inst, buckets, res.x, res.n, (tbar * res.x).sum(axis=0))
            if bins is not None and makespan(inst, bins) < best_t:
                best, best_t = bins, makespan(inst, bins)
        return best

    def _realise(
        self, inst: Instance, buckets: np.ndarray, x: np.ndarray, n: np.ndarray, load: np.ndarray
    ) -> list[Bin] | None:
        bins = [Bin(int(k)) for k in range(len(n)) for _ in range(int(n[k]))]
        bins += self._fill(inst, n, load)
        left = x.copy()
        by_shape: dict[int, list[int]] = {}
        for s in np.argsort(-inst.lengths, kind="stable"):
            ks = np.nonzero(left[buckets[s]])[0]
            k = int(ks[np.argmax(inst.sizes[ks])])  # longest of a bucket to the largest shape it uses
            left[buckets[s], k] -= 1
            by_shape.setdefault(k, []).append(int(s))
        for k, seqs in by_shape.items():
            if not list_schedule(inst, [b for b in bins if b.k == k], seqs):
                return None
        improve(inst, bins)
        return bins
