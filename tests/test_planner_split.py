"""Planner, second pass: the step bound over every split (brute force), the split search, the run-static and
oracle baselines, the run-cost arithmetic, communicator memory, and the whole-step time cap."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import cache

import numpy as np
import pytest

from planner.baselines import oracle_static, run_static
from planner.cost import CostModel, communicators_per_rank
from planner.planner import Planner, PlannerConfig
from planner.report import summarise
from planner.run_cost import run_cost
from planner.types import Cluster, GroupShape, ModelShape
from sp.groups import needed_lists
from tests.test_planner import EXACT, MODEL, brute_force, check_invariants

SMALL = CostModel(
    Cluster(
        name="s",
        nodes=2,
        gpus_per_node=2,
        peak_tflops=100,
        mfu=0.5,
        memory_gib=4.0,
        intra_gbs=100,
        inter_gbs=5,
        beta_ms=20,
    ),  # fmt: skip
    MODEL,
)


def best_over_all_splits(lengths: list[int], cost: CostModel) -> float:
    """The optimal step over every partition of the sequences into micro-steps, each micro-step planned
    optimally by enumeration (``brute_force``): a DP over subsets, independent of the planner."""
    n = len(lengths)

    @cache
    def micro(mask: int) -> float:
        return brute_force([lengths[i] for i in range(n) if mask >> i & 1], cost)

    @cache
    def best(mask: int) -> float:
        if mask == 0:
            return 0.0
        low = mask & -mask
        out, sub = math.inf, mask
        while sub:
            if sub & low:
                out = min(out, micro(sub) + best(mask & ~sub))
            sub = (sub - 1) & mask
        return out

    return best((1 << n) - 1)


def _instances() -> list[list[int]]:
    rng = np.random.default_rng(7)
    cap = SMALL.tokens_capacity(1)
    out = [[int(cap * 2.5), int(cap * 1.5), int(cap * 0.9), int(cap * 0.5), 300]]
    for _ in range(7):
        out.append([int(x) for x in np.minimum(rng.lognormal(np.log(cap * 1.1), 0.8, size=5) + 1, cap * 3.9)])
    return out


def test_step_bound_is_below_the_optimum_over_all_splits():
    """bound <= optimum over every split <= the planner's plan, on instances where memory forces 1-3
    micro-steps (brute force: every partition, every group layout, every assignment)."""
    multi = 0
    for lengths in _instances():
        opt = best_over_all_splits(lengths, SMALL)
        plan = Planner(SMALL, EXACT).plan(lengths)
        check_invariants(plan, SMALL)
        assert plan.step_bound_s is not None
        assert plan.step_bound_s <= opt * (1 + 1e-9), (lengths, plan.step_bound_s, opt)
        assert opt <= plan.time_s * (1 + 1e-9)
        multi += len(plan.micro_steps) > 1
    assert multi >= 2, "the instances must exercise multi-micro-step splits"


def test_split_search_goes_above_the_memory_floor_when_it_helps():
    """Memory needs two micro-steps, but the best step (brute force over all splits) has three; the
    planner finds it, and every two-micro-step split is slower."""
    # fractions of one GPU's token capacity (found by search with per-layout capacities: the whole cluster holds
    # 24,205 tokens as one ring of 4, 3.98x one GPU's 6,075)
    lengths = [int(f * SMALL.tokens_capacity(1)) for f in (0.86462, 0.58808, 3.60962, 2.81018, 0.03209)]
    cap = max(SMALL.tokens_capacity(4, s) for s in (GroupShape(1, 4), GroupShape(4, 1), GroupShape(2, 2)))
    assert math.ceil(sum(lengths) / cap) == 2
    plan = Planner(SMALL, EXACT).plan(lengths)
    check_invariants(plan, SMALL)
    assert len(plan.micro_steps) == 3
    assert plan.time_s == pytest.approx(best_over_all_splits(lengths, SMALL), rel=1e-9)
    two = math.inf
    for mask in range(1, 1 << (len(lengths) - 1)):  # every split into two parts (item 4 in the second)
        a = [x for i, x in enumerate(lengths) if mask >> i & 1]
        b = [x for i, x in enumerate(lengths) if not mask >> i & 1]
        two = min(two, brute_force(a, SMALL) + brute_force(b, SMALL))
    assert plan.time_s < two


def test_run_static_and_oracle_by_hand():
    cost = SMALL
    cap = cost.tokens_capacity
    # three layouts, two batches; u1r1 cannot hold max_len, u2r1 and u1r4 can
    per_batch = [
        {"layouts": {"u1r1": 1.0, "u2r1": 3.0, "u1r4": 4.0}},
        {"layouts": {"u1r1": 1.0, "u2r1": 5.0, "u1r4": 3.5}},
    ]
    max_len = int(cap(2)) - 1
    assert cap(1) < max_len <= cap(2) <= cap(4)
    assert run_static(cost, per_batch, max_len) == ("u1r4", [4.0, 3.5])  # mean 3.75 < 4.0 for u2r1
    assert run_static(cost, per_batch, max_len, "ulysses") == ("u2r1", [3.0, 5.0])
    assert oracle_static(per_batch) == [1.0, 1.0]
    with pytest.raises(ValueError, match="valid:"):
        run_static(cost, per_batch, max_len, "zigzag")


def test_summary_baselines_on_a_tiny_run():
    """Two batches through the real planner: ``static`` is one layout for both batches and holds max_len;
    the oracle is never slower than it; speed-ups are ratios of the means."""
    from planner.baselines import all_baselines

    cfg = PlannerConfig(time_limit_s=2.0)
    batches = [[9000, 3000, 800, 500], [2000, 1500, 1200, 700, 300]]
    plans = [Planner(SMALL, cfg).plan(b) for b in batches]
    per = [all_baselines(SMALL, b, cfg, p) for b, p in zip(batches, plans)]
    s = summarise(SMALL, plans, per, max_len=9000)
    key = s["baselines"]["static_layout"]
    shape = GroupShape(int(key[1 : key.index("r")]), int(key[key.index("r") + 1 :]))
    assert SMALL.tokens_capacity(shape.size) >= 9000
    assert s["baselines"]["static"] == pytest.approx(np.mean([b["layouts"][key] for b in per]))
    assert s["baselines"]["oracle_static"] <= s["baselines"]["static"] + 1e-12
    assert s["speedup_vs_static"] == pytest.approx(s["baselines"]["static"] / s["planned_step_s"])
    assert s["lower_bound_s"] <= s["planned_step_s"]
    assert s["memory_gib"]["total"] == pytest.approx(s["peak_memory_gib"])  # the breakdown adds up to the peak


def test_run_cost_arithmetic_by_hand():
    # identical steps: 1e6 tokens in 10 s on 8 GPUs of 100 TFLOP/s, 4e17 FLOPs per step
    r = run_cost([10.0] * 3, [1e6] * 3, [4e17] * 3, tokens=2e9, world=8, peak_tflops=100, usd_per_gpu_hour=2.5)
    assert r["steps"] == 2000
    for q in ("p10", "p50", "p90"):
        assert r["wall_hours"][q] == pytest.approx(2000 * 10 / 3600)
        assert r["gpu_hours"][q] == pytest.approx(2000 * 10 * 8 / 3600)
        assert r["usd"][q] == pytest.approx(2000 * 10 * 8 / 3600 * 2.5)
        assert r["tokens_per_s_per_gpu"][q] == pytest.approx(1e6 / 10 / 8)
        assert r["mfu"][q] == pytest.approx(4e17 / (10 * 8 * 100e12))
    # unequal steps: the point estimate is a ratio of sums, the spread brackets it
    r = run_cost([10.0, 30.0], [1e6, 1e6], [1.0, 1.0], tokens=2e6, world=1, peak_tflops=1, usd_per_gpu_hour=None)
    assert r["usd"] is None and r["steps"] == 2
    assert r["wall_hours"]["p10"] <= 40 / 3600 <= r["wall_hours"]["p90"]
    assert r["wall_hours"]["p10"] < r["wall_hours"]["p90"]
    with pytest.raises(ValueError, match="run.tokens"):
        run_cost([1.0], [1.0], [1.0], tokens=0, world=1, peak_tflops=1, usd_per_gpu_hour=None)


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 2), (1, 3), (2, 3), (1, 8), (3, 8)])
def test_communicator_count_matches_the_group_pool(nodes, gpus):
    """The cost model's count: the default group plus what the pool may hold, at most max_communicators; the
    groups a rank can be in counted here from sp.groups' own sub-group lists over every contiguous placement."""
    world = nodes * gpus
    groups = []
    for size in [*range(1, gpus + 1), *(k * gpus for k in range(2, nodes + 1))]:
        firsts = ([n * gpus + o for n in range(nodes) for o in range(gpus - size + 1)] if size <= gpus
                  else [n * gpus for n in range(nodes - size // gpus + 1)])  # fmt: skip
        for f in firsts:
            groups += [(tuple(range(f, f + size)), u) for u in range(1, size + 1)
                       if size % u == 0 and (size <= gpus or gpus % u == 0 or u % gpus == 0)]  # fmt: skip
    lists = {r for kind in needed_lists(groups) for r in kind}
    most = max((sum(rank in r for r in lists) for rank in range(world)), default=0)
    for bound in (3, 12, 1000):
        cluster = Cluster(name="c", nodes=nodes, gpus_per_node=gpus, max_communicators=bound)
        assert communicators_per_rank(cluster) == 1 + min(bound, most)  # + the default group


def test_communicator_memory_is_counted_and_lowers_capacity():
    base = Cluster(name="h", nodes=8, gpus_per_node=8, memory_gib=76.0, peak_tflops=989)
    model = ModelShape(name="m", layers=4, hidden=1024, heads=8)
    free = CostModel(base, model)
    paid = CostModel(Cluster(**{**base.__dict__, "comm_gib_per_group": 0.25}), model)
    assert paid.comm_gib() == pytest.approx(13 * 0.25)  # the default group + 12 kept by the pool
    assert paid.memory_gib(1000, 1) - free.memory_gib(1000, 1) == pytest.approx(3.25)
    assert paid.tokens_capacity(1) < free.tokens_capacity(1)
    br = paid.memory_breakdown_gib(10000)
    assert br["total"] == pytest.approx(paid.memory_gib(10000, 1))
    assert br["communicators"] == pytest.approx(3.25)


@pytest.mark.slow
def test_time_limit_caps_the_whole_step():
    """20,000 sequences on a small cluster used to take 196 s against a 0.15 s limit per micro-step; the
    limit now caps the whole step (past it only the first feasible greedy plan is completed)."""
    from planner.types import Cluster as C

    cost = CostModel(C(name="cpu", nodes=1, gpus_per_node=4, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                       intra_gbs=1, inter_gbs=1, beta_ms=5),  # fmt: skip
                     ModelShape(name="tiny", layers=2, hidden=64, heads=4, kv_heads=2, vocab=256))  # fmt: skip
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.9, 1.4, size=20000).astype(int) + 1, 4096)
    t0 = time.perf_counter()
    plan = Planner(cost, PlannerConfig(time_limit_s=0.15)).plan(lengths)
    assert time.perf_counter() - t0 < 15.0  # a loose bound on a loaded CI machine; 0.5 s measured here
    assert sorted(s for m in plan.micro_steps for g in m.groups for s in g.seqs) == list(range(20000))


def test_with_checkpointing_rescales_fitted_and_measured_constants():
    cl = Cluster(name="f", nodes=1, gpus_per_node=8, alpha1_ms=1e-6, alpha2_ms=0.2, act_bytes_per_token=1e6)
    sel = CostModel(cl, ModelShape(name="m", layers=4, hidden=1024, heads=8, checkpointing="selective"))
    full = sel.with_checkpointing("full")
    assert full.cluster.alpha1_ms == pytest.approx(1e-6)  # the attention core is recomputed in both
    assert full.cluster.alpha2_ms == pytest.approx(0.2 * 4 / 3)  # the rest only under full
    plain = lambda c: CostModel(Cluster(**{**c.cluster.__dict__, "act_bytes_per_token": None}), c.model)  # noqa: E731
    assert full.act_bytes_per_token == pytest.approx(
        1e6 * plain(full).act_bytes_per_token / plain(sel).act_bytes_per_token
    )
    assert full.act_bytes_per_token < sel.act_bytes_per_token
    assert sel.with_checkpointing("selective") is sel


def test_plan_picks_full_checkpointing_only_where_it_pays():
    """Selective checkpointing is faster but cannot hold the long sequence on the cluster; with both modes
    allowed, the long sequence's micro-step runs full and the short ones' selective. (A fast network: at 5 GB/s
    FSDP's 0.2 s per micro-step would make the fewest micro-steps, all under full, the best plan.)"""
    model = ModelShape(name="m", layers=8, hidden=1024, heads=8, kv_heads=2, vocab=32000, checkpointing="selective")
    cost = CostModel(replace(SMALL.cluster, inter_gbs=200.0), model)
    full = cost.with_checkpointing("full")
    long = int(min(full.tokens_capacity(4), 3 * cost.tokens_capacity(4)))
    assert cost.tokens_capacity(4) < long <= full.tokens_capacity(4)
    lengths = [long] + [int(cost.tokens_capacity(1) * 0.9)] * 8
    with pytest.raises(ValueError, match="exceeds what the cluster can hold"):
        Planner(cost, EXACT).plan(lengths)
    plan = Planner(cost, PlannerConfig(**{**EXACT.__dict__, "checkpointing": ("selective", "full")})).plan(lengths)
    modes = {m.checkpointing for m in plan.micro_steps}
    assert modes == {"full", "selective"}
    for m in plan.micro_steps:
        c = cost.with_checkpointing(m.checkpointing)
        for g in m.groups:
            assert sum(plan.lengths[s] for s in g.seqs) <= c.tokens_capacity(g.shape.size, g.shape) + 1e-6
        longest = max(plan.lengths[s] for g in m.groups for s in g.seqs)
        assert (m.checkpointing == "full") == (longest == long)
    with pytest.raises(ValueError, match="valid modes"):
        Planner(cost, PlannerConfig(checkpointing=("some",)))
    # at 5 GB/s between nodes each micro-step pays FSDP's exposed collectives (0.2 s here, 4x beta): the plan
    # takes fewer micro-steps, more of them under full checkpointing (the roomier mode), and is no slower than
    # the best plan under full checkpointing alone
    slow = CostModel(SMALL.cluster, model)
    assert slow.fsdp_time.comm_s > 0.15
    fewer = Planner(slow, PlannerConfig(**{**EXACT.__dict__, "checkpointing": ("selective", "full")})).plan(lengths)
    share = lambda p: sum(m.checkpointing == "full" for m in p.micro_steps) / len(p.micro_steps)  # noqa: E731
    assert len(fewer.micro_steps) < len(plan.micro_steps) and share(fewer) > share(plan)
    assert fewer.time_s <= Planner(slow.with_checkpointing("full"), EXACT).plan(lengths).time_s * (1 + 1e-9)


def test_split_families_are_partitions_within_memory():
    from planner.microsteps import balanced_split, contiguous_split, mixed_split, timed_split

    rng = np.random.default_rng(5)
    lengths = np.minimum(rng.lognormal(7, 1.5, size=300).astype(np.int64) + 1, 60000)
    work = lengths * 1e-4 + lengths.astype(float) ** 2 * 1e-9
    finish = work / 4 + 0.02
    cap = float(lengths.sum()) / 3.5
    for m in (4, 5, 8):
        for parts in (contiguous_split(lengths, m), balanced_split(lengths, m, work, cap),
                      mixed_split(lengths, m, work, finish, cap, 64, 0.02),
                      timed_split(lengths, m, work, finish, cap, 64, 0.02)):  # fmt: skip
            assert parts is not None and len(parts) <= m
            assert sorted(np.concatenate(parts).tolist()) == list(range(len(lengths)))
        for parts in (balanced_split(lengths, m, work, cap), timed_split(lengths, m, work, finish, cap, 64, 0.02)):
            assert parts is not None and all(lengths[p].sum() <= cap for p in parts)
    timed = timed_split(lengths, 5, work, finish, cap, 64, 0.02)
    assert timed is not None
    order = np.argsort(-lengths, kind="stable")
    assert np.array_equal(np.concatenate(timed), order)  # contiguous runs of the sorted order
    assert timed_split(lengths, 2, work, finish, cap, 64, 0.02) is None  # 3.5 capacities need >= 4 runs
