"""The per-step planner: step bound, micro-step split search, fast plans, MILP refinement, packing.

``Planner(cost).plan(lengths)`` returns a :class:`~planner.types.StepPlan` within ``time_limit_s`` (the whole
step's solve):

1. time every sequence on every candidate shape (``tmat``), once per checkpointing mode it may use;
2. the step bound over every split (:func:`planner.bounds.step_bound`);
3. the split search (:func:`planner.microsteps.search_split`, first half of the time): each candidate split
   is scored by fast plans of its parts: fluid bound, greedy (fluid sizing + longest-first list scheduling
   + local search) and every static layout, the best over the checkpointing modes;
4. refinement of the chosen split's micro-steps in the remaining time, where a fast plan is more than
   ``gap_tol`` above its micro-step's fluid bound: bisection on the target makespan T, each probe a MILP of
   :mod:`planner.milp` (shape counts and bucket assignment) packed into groups plus local search. Small
   micro-steps (``exact_max_pairs``) use the exact instance model instead: every infeasible probe proves its
   T unreachable, so the micro-step's bound rises to meet the plan.

The search is time-capped and therefore not deterministic across calls: plan on one rank and broadcast.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from planner.bounds import fluid_bound, quick_bound, step_bound
from planner.bucketing import bucketize
from planner.candidates import STRATEGIES, candidate_shapes
from planner.cost import CostModel
from planner.microsteps import check_lengths, search_split
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
from planner.state_offload import STATE_OFFLOAD
from planner.topology import GROUP_SIZES, Topology
from planner.types import CHECKPOINTING, GroupShape, MemoryMode, MicroStep, ModelShape, StepPlan


@dataclass(frozen=True, kw_only=True)
class PlannerConfig:
    time_limit_s: float = 2.0  # the whole step's solve (split search + MILP refinement), a hard cap; 0 = auto:
    # AUTO_LIMIT_S for up to AUTO_GPUS GPUs, proportionally more beyond (more GPUs: more group shapes, longer steps)
    milp_time_limit_s: float = 0.5  # per MILP probe
    gap_tol: float = 0.01  # the MILP stops at this relative gap
    max_probes: int = 8  # MILP probes of the step time per micro-step
    max_buckets: int = 24  # length buckets of the MILP (sequences of similar length share a column)
    strategies: tuple[str, ...] = STRATEGIES  # strategies groups may use: none, ulysses, ring, hybrid
    group_sizes: str = "any"  # any: every size up to a node and every multiple of one; powers_of_two: those only
    use_milp: bool = True  # refine the fast plan with the MILP (false: greedy plans only)
    checkpointing: tuple[str, ...] = ()  # modes a micro-step may pick besides the model's (e.g. offload)
    loss_chunk_tokens: tuple[int, ...] = ()  # loss chunks a micro-step may pick besides the model's (0 = off)
    tile_tokens: tuple[int, ...] = ()  # sequence tiles a micro-step may pick besides the model's (0 = off)
    head_chunks: tuple[int, ...] = ()  # Ulysses head chunks a micro-step may pick besides the model's (>= 1)
    state_offload: str = "auto"  # states in host memory: auto (when the run's longest sequence needs it), on, off
    max_extra_micro_steps: int = 8  # the split search tries up to this many micro-steps over the memory floor
    exact_max_pairs: int = 1500  # micro-steps with at most this many (sequence, group instance) pairs solve exactly
    recalibrate_every: int = 10  # sp-train re-fits the cost model's time constants every N steps (0 = never)
    recalibrate_window: int = 30  # ... on the last N steps (planner.fit; the last quarter is held out)

    def __post_init__(self) -> None:
        if self.time_limit_s < 0:
            raise ValueError(f"planner.time_limit_s={self.time_limit_s}; valid: 0 (auto) or seconds > 0")
        if self.state_offload not in STATE_OFFLOAD:
            raise ValueError(f"planner.state_offload={self.state_offload!r}; valid: {list(STATE_OFFLOAD)}")
        if self.group_sizes not in GROUP_SIZES:
            raise ValueError(f"planner.group_sizes={self.group_sizes!r}; valid: {list(GROUP_SIZES)}")
        if self.recalibrate_every < 0 or self.recalibrate_window < 2:
            raise ValueError(f"planner.recalibrate_every={self.recalibrate_every} (valid: >= 0, 0 = off), "
                             f"planner.recalibrate_window={self.recalibrate_window} (valid: >= 2 steps)")  # fmt: skip


def memory_modes(model: ModelShape, config: PlannerConfig) -> tuple[MemoryMode, ...]:
    """Every memory mode a micro-step may run with: the product of the planner's checkpointing, loss-chunk,
    MLP-tile and head-chunk choices, each the model's own setting first and then the ones listed, in the order given."""
    bad = [m for m in config.checkpointing if m not in CHECKPOINTING]
    if bad:
        raise ValueError(f"planner.checkpointing={list(config.checkpointing)}; valid modes: {CHECKPOINTING}")
    for name in ("loss_chunk_tokens", "tile_tokens"):
        if any(n < 0 for n in getattr(config, name)):
            raise ValueError(f"planner.{name}={list(getattr(config, name))}; valid: 0 (off) or token counts >= 1")
    if any(n < 1 for n in config.head_chunks):
        raise ValueError(f"planner.head_chunks={list(config.head_chunks)}; valid: chunk counts >= 1")
    own = MemoryMode.of(model)
    modes = [
        MemoryMode(c, n, t, h)
        for c in dict.fromkeys((own.checkpointing, *config.checkpointing))
        for n in dict.fromkeys((own.loss_chunk_tokens, *config.loss_chunk_tokens))
        for t in dict.fromkeys((own.tile_tokens, *config.tile_tokens))
        for h in dict.fromkeys((own.head_chunks, *config.head_chunks))
    ]
    return tuple(dict.fromkeys(modes))


FINISH_RESERVE = 0.1  # share of planner.time_limit_s kept for the work after the search's deadline
AUTO_LIMIT_S, AUTO_GPUS = 0.1, 64  # planner.time_limit_s=0: 0.1 s up to 64 GPUs, 0.1 x GPUs / 64 beyond


class Planner:
    def __init__(
        self, cost: CostModel, config: PlannerConfig | None = None, shapes: list[GroupShape] | None = None
    ) -> None:
        self.cost = cost
        self.config = config or PlannerConfig()
        self.modes = memory_modes(cost.model, self.config)
        self.costs = {m: cost.with_mode(m) for m in self.modes}
        self.roomiest = max(self.costs.values(), key=lambda c: c.tokens_capacity(1))
        self.world = cost.cluster.world
        self.topology = Topology(cost.cluster.nodes, cost.cluster.gpus_per_node, self.config.group_sizes)
        self.shapes = shapes or candidate_shapes(cost.model, self.topology, self.config.strategies)
        self.method = "milp" if self.config.use_milp else "greedy"
        self.time_limit_s: float = self.config.time_limit_s or AUTO_LIMIT_S * max(1.0, self.world / AUTO_GPUS)

    # ---- public ----
    def check_fits(self, lengths: list[int] | np.ndarray) -> None:
        """Raise, naming what each memory-technique set would hold and what would hold the longest sequence,
        when no mode the planner may use holds it."""
        longest = int(np.max(lengths)) if len(lengths) else 0
        if longest > max(c.tokens_capacity(s.size, s) for c in self.costs.values() for s in self.shapes):
            from planner.capacity import refusal

            raise ValueError(refusal(longest, self.cost, self.shapes, self.modes))

    def plan(self, lengths: list[int] | np.ndarray) -> StepPlan:
        """Plan one step within ``time_limit_s`` (the whole step): the split search gets the first half, the
        MILP refinement of the chosen split's micro-steps the rest. Past the deadline only fast greedy plans
        are made (a plan is always returned)."""
        t0 = time.perf_counter()
        # the last tenth of the cap is kept for what follows the last search step (realising its bins,
        # weighing static layouts, assembling the plan): the cap holds for the whole call
        deadline = t0 + (1.0 - FINISH_RESERVE) * self.time_limit_s
        self.check_fits(lengths)
        arr = check_lengths(lengths, self.roomiest, self.shapes)
        fulls = {m: self.instance(arr, mode=m) for m in self.modes}
        # the bound and the split see the relaxation over modes: fastest times, roomiest capacities
        tmat = np.min([f.tmat for f in fulls.values()], axis=0)  # [S, K]
        cap_k = np.max([f.capacity for f in fulls.values()], axis=0)  # [K]
        beta = np.min([f.beta for f in fulls.values()], axis=0)  # [K]
        sizes = next(iter(fulls.values())).sizes
        fits = arr[:, None] <= cap_k[None, :]
        capacity = float((cap_k / sizes).max()) * self.world  # tokens one micro-step can hold
        bound = step_bound(tmat, sizes.astype(float), fits, self.world, beta, arr, capacity)
        bound += self._fsdp_bound(bound, math.ceil(arr.sum() / capacity - 1e-9))
        finish = np.where(fits, tmat + beta[None, :], np.inf).min(axis=1)
        work = np.where(fits, tmat * sizes[None, :], np.inf).min(axis=1)
        split_deadline = t0 + 0.5 * self.time_limit_s
        # part bounds: the split search's estimate, then its plan
        memo: dict[tuple[MemoryMode | None, bytes], float] = {}
        choice = search_split(
            arr, work, finish, capacity, self.world, float(beta.min()),
            lambda ids: self._micro_fast(fulls, ids, split_deadline, memo), lambda ms: sum(m.time_s for m in ms),
            lambda ids: min(self._part_bound(f, ids, memo) for f in fulls.values()), split_deadline,
            self.config.max_extra_micro_steps,
        )  # fmt: skip
        micro = []
        for i, (ids, fast) in enumerate(zip(choice.parts, choice.plans)):
            share = (deadline - time.perf_counter()) / (len(choice.parts) - i)
            full = fulls[fast.memory] if fast is not None and fast.memory in fulls else fulls[self.modes[0]]
            micro.append(self._refine(full, ids, fast, time.perf_counter() + share))
        plan = StepPlan(tuple(int(x) for x in arr), tuple(micro), time.perf_counter() - t0, self.method)
        return replace(plan, step_bound_s=min(bound, plan.time_s), split=choice.kind, splits_tried=choice.tried)

    def instance(
        self, lengths: np.ndarray, shapes: list[GroupShape] | None = None, mode: MemoryMode | None = None
    ) -> Instance:
        """Times [S, K], capacities and overheads of every shape under memory ``mode`` (default: the first
        the planner may use). Micro-steps record their mode only when the planner chooses between several."""
        shapes = shapes or self.shapes
        mode = mode or self.modes[0]
        cost = self.costs[mode]
        tmat = cost.seq_time_matrix(lengths, shapes)  # [S, K]
        sizes = np.array([sh.size for sh in shapes])
        cap = np.array([cost.tokens_capacity(sh.size, sh) for sh in shapes])
        beta = np.array([cost.group_overhead_s(sh) for sh in shapes])
        label = mode if len(self.modes) > 1 else None
        return Instance(lengths, tmat, tuple(shapes), sizes, cap, beta, self.topology, label)

    def plan_micro(self, all_lengths: np.ndarray, ids: np.ndarray, search: bool = True) -> MicroStep | None:
        """Plan one micro-step over sequences ``ids`` on its own (greedy, then the MILP search when
        ``search``); None when it cannot fit."""
        full = self.instance(all_lengths)
        fast = self._micro_greedy(full, ids)
        if not search:
            return fast
        return self._refine(full, ids, fast, time.perf_counter() + self.time_limit_s)

    def solves_exactly(self, lengths: np.ndarray) -> bool:
        """Whether a micro-step of these sequences is small enough for the exact instance MILP (whose
        infeasible probes prove bounds)."""
        return self._exact_size(self.instance(np.asarray(lengths))) <= self.config.exact_max_pairs

    # ---- one micro-step ----
    def _cost(self, inst: Instance) -> CostModel:
        return self.costs[inst.mode or self.modes[0]]

    def _micro_fast(
        self, fulls: dict[MemoryMode, Instance], ids: np.ndarray, deadline: float,
        memo: dict[tuple[MemoryMode | None, bytes], float],
    ) -> MicroStep | None:  # fmt: skip
        """The fastest of the part's fast plans over the memory modes the planner may choose. Modes go in the
        order of their part bound, and a mode whose bound is not below the best plan found is skipped: no plan
        in it can be faster (a step's time rises with its groups' time), so the result is the same as planning
        every mode, at a fraction of the work when the model's own mode fits (the usual case). Past ``deadline``
        the best plan so far is returned."""
        bounds = []
        for mode, full in fulls.items():
            sub = full.take(ids)
            if sub.lengths.sum() > sub.capacity.max() / sub.sizes.max() * self.world:
                continue  # the part's tokens exceed what this mode holds
            bounds.append((quick_bound(sub, self.world), mode))
        best: MicroStep | None = None
        for bound, mode in sorted(bounds, key=lambda b: b[0]):
            if not np.isfinite(bound) or (
                best is not None and (bound >= best.groups_s or time.perf_counter() > deadline)
            ):
                break  # no faster plan in the remaining modes, or past the deadline with a plan in hand
            plan = self._micro_greedy(fulls[mode], ids, deadline, memo)
            if plan is not None and (best is None or plan.time_s < best.time_s):
                best = plan
        return best

    def _part_bound(
        self, full: Instance, ids: np.ndarray, memo: dict[tuple[MemoryMode | None, bytes], float] | None
    ) -> float:
        """The fluid bound of a part, computed once per (mode, part) within one ``plan`` call."""
        key = (full.mode, np.asarray(ids).tobytes())
        if memo is None or key not in memo:
            bound = self._fluid(full.take(ids))
            if memo is None:
                return bound
            memo[key] = bound
        return memo[key]

    def _micro_greedy(
        self, full: Instance, ids: np.ndarray, deadline: float = math.inf,
        memo: dict[tuple[MemoryMode | None, bytes], float] | None = None,
    ) -> MicroStep | None:  # fmt: skip
        """The fast plan of a part (scores splits): fluid bound, greedy, local search; None if it cannot fit."""
        sub = full.take(ids)
        if sub.lengths.sum() > sub.capacity.max() / sub.sizes.max() * self.world:
            return None
        bound = self._part_bound(full, ids, memo)
        if not np.isfinite(bound):
            return None  # a sequence fits no shape in this mode
        inst = sub if self._exact_size(sub) <= self.config.exact_max_pairs else self._pruned(sub)
        inst = self._chain_part(inst) or inst  # the fast plans use the sizes that never fragment a node
        bins = self._greedy(inst, bound, deadline)
        fast = to_micro_step(inst, bins, ids, self._cost(inst), bound) if bins is not None else None
        static = self._best_static(sub, ids, bound, fast.groups_s if fast is not None else math.inf)
        return static if static is not None else fast

    def _refine(self, full: Instance, ids: np.ndarray, fast: MicroStep | None, deadline: float) -> MicroStep:
        """Improve a part's fast plan: the MILP search (only where the fast plan is more than ``gap_tol``
        above the part's bound and time is left), then every static layout of the part (so the planner never
        returns anything slower than a static layout on the same split)."""
        sub = full.take(ids)
        bound = fast.lower_bound_s if fast is not None else self._fluid(sub)  # the fast plan carries it
        exact = self._exact_size(sub) <= self.config.exact_max_pairs
        inst = sub if exact else self._pruned(sub)
        best: MicroStep | None = fast
        open_gap = fast is None or fast.groups_s - bound > self.config.gap_tol * fast.groups_s
        if self.config.use_milp and open_gap and time.perf_counter() < deadline:
            start = self._greedy(inst, bound, deadline)
            if exact:
                bins, bound = self._search_exact(inst, bound, start, deadline)
            else:
                bins = self._search(inst, bound, start, deadline)
            if bins is not None and (best is None or makespan(inst, bins) < best.groups_s):
                best = to_micro_step(inst, bins, ids, self._cost(inst), bound)
        if best is not fast:  # the fast plan already weighed every static layout
            static = self._best_static(sub, ids, bound, best.groups_s if best is not None else math.inf)
            best = static if static is not None else best
        if best is None:
            raise ValueError(f"could not plan a micro-step of {len(ids)} sequences on {self.world} GPUs")
        return replace(best, lower_bound_s=bound)

    def _fsdp_bound(self, bound: float, floor: int) -> float:
        """FSDP's least exposure over a step whose micro-steps' groups take ``bound`` seconds in all and number
        at least ``floor``: each micro-step pays ``max(edge, comm - overlap T_i)``, whose sum is at least
        ``max(m edge, m comm - overlap sum T_i)``; with ``T + exposure`` rising in both, ``m = floor`` and
        ``sum T_i = bound`` give the least (the modes share one FSDP time)."""
        f = next(iter(self.costs.values())).fsdp_time
        if not f.collectives:
            return 0.0
        return max(floor * f.edge_s, floor * f.comm_s - f.overlap * bound)

    def _fluid(self, sub: Instance) -> float:
        fits = sub.lengths[:, None] <= sub.capacity[None, :]
        return fluid_bound(sub.tmat, sub.sizes.astype(float), fits, self.world, sub.beta)

    def _best_static(self, full: Instance, ids: np.ndarray, bound: float, beat: float) -> MicroStep | None:
        """The best single-shape layout (as many identical groups as fit, longest first) of this micro-step if it
        beats ``beat``. Shapes whose simple bound (longest sequence, or their work over their groups)
        cannot beat it are skipped without scheduling."""
        best, best_t = None, beat
        seqs = list(range(len(full.lengths)))
        fits = full.lengths.max() <= full.capacity
        for k in np.argsort(full.tmat.sum(axis=0) * full.sizes):
            n = self.topology.max_groups(int(full.sizes[k]))  # a size that does not divide the world leaves GPUs idle
            quick = full.beta[k] + max(full.tmat[:, k].max(), full.tmat[:, k].sum() / n)
            if not fits[k] or quick >= best_t:
                continue
            bins = identical_schedule(full, int(k), n, seqs)
            if bins is not None and makespan(full, bins) < best_t:
                best, best_t = bins, makespan(full, bins)
        return to_micro_step(full, best, ids, self._cost(full), bound) if best is not None else None

    def _exact_size(self, inst: Instance) -> int:
        n = len(inst.lengths)
        return n * sum(min(self.topology.max_groups(int(p)), n) for p in inst.sizes)

    def _search_exact(
        self, inst: Instance, bound: float, best: list[Bin] | None, deadline: float
    ) -> tuple[list[Bin] | None, float]:
        """Bisection on T with the exact instance model: an infeasible probe proves a better bound."""
        best_t = makespan(inst, best) if best is not None else math.inf
        lo, hi = bound, best_t if math.isfinite(best_t) else bound * 4
        placement = self._placement(inst)
        for _ in range(self.config.max_probes * 3):
            if hi - lo <= self.config.gap_tol * hi + 1e-12 * hi or time.perf_counter() > deadline:
                break
            target = 0.5 * (lo + hi)
            left = max(1e-3, min(self.config.milp_time_limit_s, deadline - time.perf_counter()))
            res = solve_instances(
                inst.lengths,
                inst.tmat,
                inst.sizes,
                inst.capacity,
                self.world,
                target - inst.beta,
                left,
                *placement,
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
        return inst.select(np.array(keep))

    def _chain_part(self, inst: Instance) -> Instance | None:
        """The instance on the shapes whose sizes form a divisibility chain (1, 2, 4 .. up to a node, whole
        nodes), which never fragment a node; None where that is every shape."""
        keep = np.nonzero(np.isin(inst.sizes, self.topology.chain_sizes))[0]
        return inst.select(keep) if 0 < len(keep) < len(inst.sizes) else None

    def _greedy(self, inst: Instance, bound: float, deadline: float = math.inf) -> list[Bin] | None:
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
            if (n * inst.sizes).sum() <= self.world and inst.fits(n):
                break
            target *= 1.05
        else:
            return None
        bins = [Bin(int(k)) for k in range(len(n)) for _ in range(n[k])]
        bins += self._fill(inst, n, load)
        if not list_schedule(inst, bins, list(range(len(inst.lengths)))):
            return None
        improve(inst, bins, deadline=deadline)
        return bins

    def _fill(self, inst: Instance, n: np.ndarray, load: np.ndarray) -> list[Bin]:
        """Extra groups on the GPUs the counts ``n`` leave free: one more group of the used shape whose groups
        are busiest (``load / n``) while one can be placed, else the fastest shape of the largest size that
        can (planner.topology: a free GPU may sit in a node too full for a larger group). Free GPUs are tracked
        per node (a group up to a node into the fullest node it fits, a larger one on whole free nodes)."""
        n = n.astype(np.int64).copy()
        free = self.topology.free_per_node(np.repeat(inst.sizes, n).tolist())
        extra: list[Bin] = []
        g = self.topology.gpus_per_node
        while free is not None and any(free):
            whole = sum(f == g for f in free)
            room = np.where(inst.sizes <= g, inst.sizes <= max(free), inst.sizes // g <= whole)
            used = np.nonzero((load > 0) & room)[0]
            if len(used):
                k = int(used[np.argmax(load[used] / np.maximum(n[used], 1))])
            else:
                ks = np.nonzero(room)[0]
                if len(ks) == 0:
                    break
                ks = ks[inst.sizes[ks] == inst.sizes[ks].max()]
                k = int(ks[np.argmin(inst.tmat[:, ks].mean(axis=0))])
            size = int(inst.sizes[k])
            if size <= g:
                i = min((i for i, f in enumerate(free) if f >= size), key=lambda i: free[i])
                free[i] -= size
            else:
                for _ in range(size // g):
                    free[free.index(g)] = 0
            extra.append(Bin(k))
            n[k] += 1
        return extra

    def _placement(self, inst: Instance) -> tuple:
        """The MILPs' placement arguments: node rows (None where the GPU count decides), nodes, groups per shape."""
        sizes = inst.sizes
        most = np.array([self.topology.max_groups(int(p)) for p in sizes])
        return self.topology.node_rows(sizes), self.topology.nodes, most

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
        placement = self._placement(inst)
        for probe in range(self.config.max_probes):
            if hi - lo <= self.config.gap_tol * hi or time.perf_counter() > deadline:
                break
            target = lo + (hi - lo) * (0.25 if probe == 0 else 0.5)
            left = max(1e-3, min(self.config.milp_time_limit_s, deadline - time.perf_counter()))
            res = solve_counts(
                counts,
                tbar,
                tmax,
                lmax,
                inst.sizes,
                inst.capacity,
                self.world,
                target - inst.beta,
                left,
                *placement,
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
