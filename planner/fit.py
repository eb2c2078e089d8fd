"""Online calibration: re-fit the cost model's time constants to the step times a run measures.

What a step measured (:class:`StepTiming`): per micro-step and group the group's shape, its sequences' lengths
and its attention time (``sp.attention`` forward + backward + recompute, its communication included; the
slowest rank of the group), per micro-step the slowest rank's busy time, and the whole step. The model of those
times is the planner's own (:class:`planner.cost.CostModel`), written as the constants of the current model
times factors:

- attention = ``alpha1`` A + sum_u ``k_a2a[u]`` U_u + ring exposed(``k_p2p[r]``, ``ring_overlap``, ``alpha1``)
  + ``k_lat`` N lat  (A: attention compute per unit alpha1, U: all-to-all time, N lat: the collectives' latency);
- micro-step = T + FSDP's exposure at T (stated, :class:`planner.types.FsdpTime`; its latency scales with
  ``k_lat``), T = max over groups of (attention + ``alpha2`` R + offload + ``beta``)  (R: the rest of the compute
  per unit alpha2; both alphas are fitted as values, so a constant that starts at 0 can still be learned);
- step = sum of micro-steps + ``step``.

:func:`fit` solves for the factors by robust (Huber) least squares on relative errors, with bounds that keep
them physical (every constant within ``1/BOUND .. BOUND`` of the run's starting value, so repeated fits
cannot drift, and an alpha that started at 0 at most ``BOUND`` times the value that alone explains a typical
micro-step; ``0 <= ring_overlap <= 1``; ``beta, step >= 0``). Factors the window cannot tell apart keep their
values (:func:`_separable`); a window with too few steps or only one kind of work is refused. The last steps of
the window are held out: a fit whose median error on them is not lower than the current model's is rejected.
:func:`apply` turns the factors into the cluster constants (``alpha1_ms``, ``alpha2_ms``, ``a2a_gbs``,
``p2p_gbs``, latencies, ``ring_overlap``,
``beta_ms``, ``step_ms``), so the planner plans with exactly the model that was fitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from planner.cost import CostModel
from planner.types import GroupShape, MemoryMode, StepPlan

BOUND = 50.0  # a factor moves at most this far from the current constant in one fit
HUBER = 0.1  # relative error beyond which a sample's weight falls (robust to stragglers)


@dataclass(frozen=True)
class GroupTiming:
    shape: GroupShape
    lengths: tuple[int, ...]
    attention_s: float  # the group's slowest rank: sp.attention fwd + bwd (+ recompute), communication included


@dataclass(frozen=True)
class MicroTiming:
    groups: tuple[GroupTiming, ...]
    time_s: float  # the slowest rank's busy time in this micro-step
    memory: MemoryMode | None = None  # the micro-step's memory mode (None: the model's)


@dataclass(frozen=True)
class StepTiming:
    step: int
    micro: tuple[MicroTiming, ...]
    time_s: float  # the measured step


def step_timing(step: int, plan: StepPlan, busy: np.ndarray, attention: np.ndarray, step_s: float) -> StepTiming:
    """A step's timings from every rank's per-micro-step busy and attention seconds (``[world, micro-steps]``)."""
    micro = []
    for i, m in enumerate(plan.micro_steps):
        groups = tuple(GroupTiming(g.shape, tuple(plan.lengths[s] for s in g.seqs),
                                   float(attention[g.first_rank : g.first_rank + g.shape.size, i].max()))
                       for g in m.groups if g.seqs)  # fmt: skip
        micro.append(MicroTiming(groups, float(busy[:, i].max()), m.memory))
    return StepTiming(step, tuple(micro), float(step_s))


def slowed(t: StepTiming, strategy: str, factor: float) -> StepTiming:
    """``t`` as if ``strategy``'s attention ran ``factor`` times slower (a synthetic cluster for tests and for
    ``SP_CALIBRATION_SLOWDOWN``): the extra time lands in the group's attention, its micro-step and the step."""
    micro, extra_step = [], 0.0
    for m in t.micro:
        groups = tuple(replace(g, attention_s=g.attention_s * (factor if g.shape.strategy == strategy else 1.0))
                       for g in m.groups)  # fmt: skip
        extra = max((g.attention_s - o.attention_s for g, o in zip(groups, m.groups)), default=0.0)
        micro.append(replace(m, groups=groups, time_s=m.time_s + extra))
        extra_step += extra
    return replace(t, micro=tuple(micro), time_s=t.time_s + extra_step)


@dataclass
class _Rows:
    """Per group of the window: the current model's terms (seconds), and indices into the micro-steps/steps."""

    attn: list[float] = field(default_factory=list)  # A
    rest: list[float] = field(default_factory=list)  # R
    fixed: list[float] = field(default_factory=list)  # offload (not fitted)
    a2a: list[float] = field(default_factory=list)  # U
    u: list[int] = field(default_factory=list)
    r: list[int] = field(default_factory=list)
    lat: list[float] = field(default_factory=list)  # N lat
    measured: list[float] = field(default_factory=list)
    micro: list[int] = field(default_factory=list)
    ring: list[tuple[int, float, float, int, int]] = field(default_factory=list)  # (row, comm, attn, fwd, bwd)


class _Problem:
    """The window in arrays: predictions under a factor vector are a few numpy operations."""

    def __init__(self, cost: CostModel, steps: list[StepTiming], anchor: CostModel | None = None) -> None:
        cl = cost.cluster
        assert cl.alpha1_ms is not None and cl.alpha2_ms is not None  # fitted form
        unit = replace(cost, cluster=replace(cl, alpha1_ms=1.0, alpha2_ms=1.0))  # compute terms per unit alpha
        rows = _Rows()
        micro_meas: list[float] = []
        micro_step: list[int] = []
        step_meas: list[float] = []
        costs: dict[MemoryMode | None, CostModel] = {}
        for si, t in enumerate(steps):
            for m in t.micro:
                c = costs.setdefault(m.memory, unit.with_mode(m.memory) if m.memory is not None else unit)
                mi = len(micro_meas)
                for g in m.groups:
                    n = np.asarray(g.lengths, dtype=np.float64)
                    a = float(np.sum(c.attention_s(n, g.shape.size)))
                    row = len(rows.attn)
                    rows.attn.append(a)
                    rows.rest.append(float(np.sum(c.compute_s(n, g.shape.size))) - a)
                    rows.fixed.append(float(np.sum(c.offload_s(n, g.shape.size))))
                    rows.a2a.append(float(np.sum(c.a2a_s(n, g.shape))))
                    rows.u.append(g.shape.ulysses)
                    rows.r.append(g.shape.ring)
                    rows.lat.append(c.collectives(g.shape) * c.latency_s(g.shape))
                    rows.measured.append(g.attention_s)
                    rows.micro.append(mi)
                    if g.shape.ring > 1:
                        comm, attn, fs, bs = c.ring_terms(n, g.shape)
                        for cc, aa in zip(np.atleast_1d(comm), np.atleast_1d(attn)):
                            rows.ring.append((row, float(cc), float(aa), fs, bs))
                micro_meas.append(m.time_s)
                micro_step.append(si)
            step_meas.append(t.time_s)
        self.layers = cost.model.layers
        self.cost = cost
        self.fsdp = cost.fsdp_time  # stated, not fitted; its latency scales with k_lat
        self.rows = {k: np.asarray(v, dtype=np.float64) for k, v in vars(rows).items() if k != "ring"}
        self.us = sorted({u for u in rows.u if u > 1})
        self.rs = sorted({r for r in rows.r if r > 1})
        self.u_idx = np.array([self.us.index(u) if u > 1 else -1 for u in rows.u], dtype=np.int64)
        ring = np.array(rows.ring, dtype=np.float64).reshape(-1, 5)  # [ring sequences, (row, comm, attn, fwd, bwd)]
        self.ring_row = ring[:, 0].astype(np.int64)
        self.ring = ring[:, 1:]
        self.ring_r = np.array([self.rs.index(int(rows.r[i])) for i in self.ring_row], dtype=np.int64)
        self.micro_of = np.asarray(rows.micro, dtype=np.int64)
        self.micro_meas = np.asarray(micro_meas, dtype=np.float64)
        self.micro_step = np.asarray(micro_step, dtype=np.int64)
        self.step_meas = np.asarray(step_meas, dtype=np.float64)
        self.names = ["alpha1_ms", "alpha2_ms", *[f"k_a2a_u{u}" for u in self.us],
                      *[f"k_p2p_r{r}" for r in self.rs], "ring_overlap", "k_lat", "beta_s", "step_s"]  # fmt: skip
        self.start = np.array([cl.alpha1_ms, cl.alpha2_ms, *[1.0] * (len(self.us) + len(self.rs)), cl.ring_overlap,
                               1.0, cl.beta_ms / 1e3, cl.step_ms / 1e3])  # fmt: skip
        self._bounds(cost, anchor or cost, float(np.median(self.micro_meas)) if len(self.micro_meas) else 1.0)

    def _bounds(self, cost: CostModel, anchor: CostModel, typical: float) -> None:
        """``lo``/``hi`` per factor and the scale of its finite differences (see the module docstring)."""
        a, cl = anchor.fitted_form().cluster, cost.cluster
        assert a.alpha1_ms is not None and a.alpha2_ms is not None
        # an alpha that alone explained a typical micro-step: the scale of a constant that starts at 0
        alone = [typical / max(float(np.median(self.rows[k][self.rows[k] > 0])) if (self.rows[k] > 0).any() else 1.0,
                               1e-300) for k in ("attn", "rest")]  # fmt: skip
        lo = [a.alpha1_ms / BOUND, a.alpha2_ms / BOUND]  # 0 when the start had none
        hi = [BOUND * max(a.alpha1_ms, alone[0]), BOUND * max(a.alpha2_ms, alone[1])]
        for sizes, table, now in ((self.us, "a2a_gbs", cl.a2a_gbs), (self.rs, "p2p_gbs", cl.p2p_gbs)):
            for n in sizes:  # the factor divides the current bandwidth; the result stays near the anchor's
                ratio = cost._bw(now, n, n > cl.gpus_per_node) / anchor._bw(getattr(a, table), n, n > a.gpus_per_node)
                lo.append(ratio / BOUND)
                hi.append(ratio * BOUND)
        lat = a.intra_latency_us / cl.intra_latency_us if cl.intra_latency_us > 0 else 1.0
        lo += [0.0, lat / BOUND, 0.0, 0.0]
        hi += [1.0, lat * BOUND, 10 * typical, 10 * typical * len(self.step_meas)]
        self.lo = np.minimum(np.array(lo), self.start)  # a start outside the bounds stays reachable
        self.hi = np.maximum(np.array(hi), self.start)
        self.scale = np.maximum(np.abs(self.start), [*alone, *[1.0] * (len(self.start) - 2)])
        self.scale[-2:] = np.maximum(self.scale[-2:], typical)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(attention per group, micro-step, step) times under factors ``x``."""
        nu, nr = len(self.us), len(self.rs)
        alpha1, alpha2 = x[0], x[1]  # ms; the unit terms are seconds per ms of alpha
        k_a2a, k_p2p = x[2 : 2 + nu], x[2 + nu : 2 + nu + nr]
        overlap, k_lat, beta, step = x[2 + nu + nr :]
        rows = self.rows
        attn = alpha1 * rows["attn"] + k_lat * rows["lat"]
        if nu:
            attn = attn + np.where(self.u_idx >= 0, rows["a2a"] * k_a2a[np.maximum(self.u_idx, 0)], 0.0)
        if len(self.ring):
            comm = self.ring[:, 0] * k_p2p[self.ring_r]
            hide = overlap * alpha1 * self.ring[:, 1]
            fwd, bwd = self.ring[:, 2], self.ring[:, 3]
            exposed = fwd * np.maximum(0.0, comm - hide) + bwd * np.maximum(0.0, comm - 2 * hide)
            attn = attn + np.bincount(self.ring_row, self.layers * exposed, minlength=len(attn))
        group = attn + alpha2 * rows["rest"] + rows["fixed"] + beta
        micro = np.full(len(self.micro_meas), beta)  # a micro-step whose groups all idle still costs beta
        np.maximum.at(micro, self.micro_of, group)
        micro = micro + self.fsdp.exposed_s(micro, k_lat)  # FSDP's exposure with the fitted latency
        steps = np.bincount(self.micro_step, micro, minlength=len(self.step_meas)) + step
        return attn, micro, steps

    def residuals(self, x: np.ndarray) -> np.ndarray:
        attn, micro, steps = self.predict(x)
        keep = self.rows["measured"] > 0  # a kernel without the attention timer (ring_flash) gives no row
        return np.concatenate(
            [
                (attn[keep] - self.rows["measured"][keep]) / self.rows["measured"][keep],
                (micro - self.micro_meas) / self.micro_meas,
                (steps - self.step_meas) / self.step_meas,
            ]
        )


def step_errors(cost: CostModel, steps: list[StepTiming]) -> np.ndarray:
    """|predicted - measured| / measured per step under ``cost``."""
    if not steps:
        return np.zeros(0)
    p = _Problem(cost.fitted_form(), steps)
    return np.abs(p.predict(p.start)[2] - p.step_meas) / p.step_meas


@dataclass(frozen=True)
class FitResult:
    accepted: bool
    reason: str  # why not, or "" when accepted
    cost: CostModel  # the new model when accepted, else the current one
    factors: dict[str, float]  # the fitted values (empty when no fit ran)
    error_before: dict[str, float]  # held-out median / p90 relative step error of the current model
    error_after: dict[str, float]
    fit_steps: tuple[int, ...] = ()
    held_out_steps: tuple[int, ...] = ()


def fit(cost: CostModel, steps: list[StepTiming], *, held_out: float = 0.25, min_steps: int = 4,
        anchor: CostModel | None = None) -> FitResult:  # fmt: skip
    """Re-fit ``cost``'s time constants to the window ``steps`` (see the module docstring); bandwidths and
    latencies stay within ``BOUND`` of ``anchor``'s (default: ``cost``; the trainer passes the run's start)."""
    base = cost.fitted_form()
    steps = sorted(steps, key=lambda t: t.step)
    n_out = max(1, int(round(held_out * len(steps))))
    train, test = steps[:-n_out], steps[-n_out:]
    before = _summary(step_errors(base, test))
    if len(train) < min_steps:
        return FitResult(False, f"too few steps: {len(train)} to fit (need {min_steps}) plus {n_out} held out",
                         cost, {}, before, before)  # fmt: skip
    work = {(g.shape, g.lengths, m.memory) for t in train for m in t.micro for g in m.groups}
    if len(work) < 2:
        why = (
            f"degenerate window: its {len(train)} steps all ran the same work, which fixes one scale, not the constants"
        )
        return FitResult(False, why, cost, {}, before, before)
    p = _Problem(base, train, anchor)
    x, why = _solve(p)
    if why:
        return FitResult(False, why, cost, {}, before, before)
    new = apply(base, p, x)
    after = _summary(step_errors(new, test))
    factors = dict(zip(p.names, map(float, x)))
    ids = tuple(t.step for t in train), tuple(t.step for t in test)
    if not after["median"] < before["median"]:
        why = f"held-out steps' median error {after['median']:.1%} would not beat the current {before['median']:.1%}"
        return FitResult(False, why, cost, factors, before, after, *ids)
    return FitResult(True, "", new, factors, before, after, *ids)


def _summary(err: np.ndarray) -> dict[str, float]:
    if not len(err):
        return {"median": float("nan"), "p90": float("nan")}
    return {"median": float(np.median(err)), "p90": float(np.percentile(err, 90))}


def _solve(p: _Problem, iters: int = 60) -> tuple[np.ndarray, str]:
    """Bounded Levenberg-Marquardt on Huber-weighted residuals over the factors the window moves.
    Returns (factors, why the window cannot be fitted or "")."""
    x = p.start.copy()
    free = _separable(p, _jacobian(p, x, np.ones(len(x), dtype=bool)))
    if not free.any():
        return x, "degenerate window: its samples do not move any constant"
    lam = 1e-3
    cost = _huber(p.residuals(x))
    for _ in range(iters):
        r = p.residuals(x)
        w = np.sqrt(np.minimum(1.0, HUBER / np.maximum(np.abs(r), 1e-12)))  # Huber weights
        jf = _jacobian(p, x, free) * w[:, None]
        g = jf.T @ (w * r)
        h = jf.T @ jf
        improved = False
        while lam < 1e8:
            step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), -g)
            trial = x.copy()
            trial[free] = np.clip(x[free] + step, p.lo[free], p.hi[free])
            c = _huber(p.residuals(trial))
            if c < cost:
                x, cost, lam, improved = trial, c, max(lam / 3, 1e-9), True
                break
            lam *= 4
        if not improved or np.max(np.abs(step)) < 1e-7:
            break
    return x, ""


PRIORITY = ("alpha1_ms", "alpha2_ms", "step_s", "beta_s", "k_a2a", "k_p2p", "ring_overlap", "k_lat")


def _separable(p: _Problem, jac: np.ndarray) -> np.ndarray:
    """The factors the window can tell apart: taken in :data:`PRIORITY` order, each joins when its column adds a
    direction the ones before it do not span (a window whose steps all have the same micro-step count cannot
    separate ``beta`` from ``step``; one without ring groups says nothing about ``ring_overlap``). The others
    keep their current values."""
    norms = np.linalg.norm(jac, axis=0)
    unit = jac / np.maximum(norms, 1e-300)
    order = sorted(range(len(p.names)), key=lambda i: PRIORITY.index(re.sub(r"_[ur]\d+$", "", p.names[i])))
    chosen: list[int] = []
    for i in order:
        if norms[i] <= 1e-12 * max(1.0, float(norms.max(initial=0.0))):
            continue
        sv = np.linalg.svd(unit[:, [*chosen, i]], compute_uv=False)
        if sv[-1] > 1e-3 * sv[0]:
            chosen.append(i)
    free = np.zeros(len(p.names), dtype=bool)
    free[chosen] = True
    return free


def _huber(r: np.ndarray) -> float:
    a = np.abs(r)
    return float(np.sum(np.where(a <= HUBER, 0.5 * a**2, HUBER * (a - 0.5 * HUBER))))


def _jacobian(p: _Problem, x: np.ndarray, free: np.ndarray) -> np.ndarray:
    r0 = p.residuals(x)
    cols = []
    for i in np.flatnonzero(free):
        h = 1e-6 * p.scale[i]
        xi = x.copy()
        xi[i] += h
        cols.append((p.residuals(xi) - r0) / h)
    return np.stack(cols, 1) if cols else np.zeros((len(r0), 0))


def apply(base: CostModel, p: _Problem, x: np.ndarray) -> CostModel:
    """The cost model whose constants are ``base``'s (fitted form) times the factors ``x``."""
    cl, nu, nr = base.cluster, len(p.us), len(p.rs)
    spans = {n: n > cl.gpus_per_node for n in (*p.us, *p.rs)}
    a2a = dict(cl.a2a_gbs) | {
        u: float(base._bw(cl.a2a_gbs, u, spans[u]) / 1e9 / k) for u, k in zip(p.us, x[2 : 2 + nu])
    }
    p2p = dict(cl.p2p_gbs) | {r: float(base._bw(cl.p2p_gbs, r, spans[r]) / 1e9 / k)
                              for r, k in zip(p.rs, x[2 + nu : 2 + nu + nr])}  # fmt: skip
    overlap, k_lat, beta, step = (float(v) for v in x[2 + nu + nr :])
    assert cl.alpha1_ms is not None and cl.alpha2_ms is not None  # fitted form
    new = replace(cl, alpha1_ms=float(x[0]), alpha2_ms=float(x[1]),
                  a2a_gbs=a2a, p2p_gbs=p2p, ring_overlap=min(1.0, max(0.0, overlap)),
                  intra_latency_us=cl.intra_latency_us * k_lat, inter_latency_us=cl.inter_latency_us * k_lat,
                  beta_ms=beta * 1e3, step_ms=step * 1e3)  # fmt: skip
    return replace(base, cluster=new)


def constants(cost: CostModel) -> dict[str, Any]:
    """The time constants a calibration carries (fitted form)."""
    cl = cost.fitted_form().cluster
    return {"alpha1_ms": cl.alpha1_ms, "alpha2_ms": cl.alpha2_ms, "beta_ms": cl.beta_ms, "step_ms": cl.step_ms,
            "a2a_gbs": {int(k): float(v) for k, v in cl.a2a_gbs.items()},
            "p2p_gbs": {int(k): float(v) for k, v in cl.p2p_gbs.items()}, "ring_overlap": cl.ring_overlap,
            "intra_latency_us": cl.intra_latency_us, "inter_latency_us": cl.inter_latency_us}  # fmt: skip
