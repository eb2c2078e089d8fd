"""Planner: optimality on tiny instances (brute force), invariants, baselines, bad inputs."""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import pytest

from planner.baselines import all_baselines, static_step_s
from planner.cost import CostModel
from planner.planner import Planner, PlannerConfig
from planner.types import Cluster, GroupShape, ModelShape, StepPlan

MODEL = ModelShape(name="m", layers=8, hidden=1024, heads=8, kv_heads=2, vocab=32000, checkpointing="full")
CLUSTER = Cluster(
    name="t", nodes=2, gpus_per_node=2, peak_tflops=100, mfu=0.5, memory_gib=11, intra_gbs=100, inter_gbs=5, beta_ms=20
)
COST = CostModel(CLUSTER, MODEL)
EXACT = PlannerConfig(time_limit_s=20.0, milp_time_limit_s=5.0, max_probes=20, gap_tol=0.0)


def _shapes_of(size):
    return [GroupShape(u, size // u) for u in MODEL.ulysses_degrees(size) if size % u == 0]


def _partitions(n):
    """Multisets of power-of-two sizes summing to n (descending)."""
    out = []

    def rec(left, max_size, acc):
        if left == 0:
            out.append(tuple(acc))
            return
        s = max_size
        while s >= 1:
            if s <= left:
                rec(left - s, s, acc + [s])
            s //= 2

    rec(n, n, [])
    return out


def fsdp_exposed(cost, compute_s: float) -> float:
    """FSDP2's collectives of one micro-step not hidden behind ``compute_s``, from first principles: each
    layer's parameters all-gathered twice (forward, backward), the root's (embedding, final norm, output
    layer) once, all gradients reduce-scattered in fp32; (N - 1) / N of the bytes through each GPU's link;
    the root's two collectives are never hidden, the rest behind ``fsdp_overlap`` of the compute."""
    m, cl = cost.model, cost.cluster
    n = cl.world
    if n == 1 or cost.sharding != "fsdp" or not cl.fsdp_comm:
        return 0.0
    root = m.vocab * m.hidden * (1 if m.tie_embeddings else 2) + m.hidden
    layer = (m.params - root) / m.layers
    spans = n > cl.gpus_per_node
    bw = (cl.inter_gbs if spans else cl.intra_gbs) * 1e9
    lat = (cl.inter_latency_us if spans else cl.intra_latency_us) * 1e-6
    b = m.bytes_per_value
    share = (n - 1) / n
    comm = (m.layers * layer * (2 * b + 4) + root * (b + 4)) * share / bw + (3 * m.layers + 2) * lat
    edge = root * (b + 4) * share / bw + 2 * lat
    return max(edge, comm - cl.fsdp_overlap * compute_s)


def brute_force(lengths, cost=COST):
    """Optimal single-micro-step time by enumeration (independent of the planner's search): the best
    makespan plus FSDP's exposure at it (a micro-step's time never falls as its makespan grows)."""
    world = cost.cluster.world
    cap = {sh: cost.tokens_capacity(sh.size, sh) for s in (1, 2, 4, 8) for sh in _shapes_of(s)}  # per layout
    best = np.inf
    for sizes in _partitions(world):
        for shapes in itertools.product(*[_shapes_of(s) for s in sizes]):
            t = np.array([[float(cost.seq_time_s(float(L), sh)) for sh in shapes] for L in lengths])
            for assign in itertools.product(range(len(shapes)), repeat=len(lengths)):
                work = np.zeros(len(shapes))
                tok = np.zeros(len(shapes))
                for s, g in enumerate(assign):
                    work[g] += t[s, g]
                    tok[g] += lengths[s]
                if any(tok[g] > cap[shapes[g]] for g in range(len(shapes))):
                    continue
                used = np.bincount(assign, minlength=len(shapes)) > 0
                fixed = np.array([cost.group_overhead_s(sh) for sh in shapes])
                best = min(best, float(np.max(np.where(used, work + fixed, 0.0))))
    return best + fsdp_exposed(cost, best)


def recompute_step(plan: StepPlan, cost=COST) -> float:
    """A plan's step time recomputed from its assignment alone."""
    total = 0.0
    for m in plan.micro_steps:
        times = [
            cost.group_overhead_s(g.shape)
            + sum(float(cost.seq_time_s(float(plan.lengths[s]), g.shape)) for s in g.seqs)
            for g in m.groups
        ]
        total += max(times) + fsdp_exposed(cost, max(times))
    return total


def check_invariants(plan: StepPlan, cost=COST):
    seen = sorted(s for m in plan.micro_steps for g in m.groups for s in g.seqs)
    assert seen == list(range(len(plan.lengths))), "every sequence exactly once"
    for m in plan.micro_steps:
        ranks = [r for g in m.groups for r in g.ranks]
        assert len(ranks) == len(set(ranks)) and max(ranks) < cost.cluster.world
        for g in m.groups:
            gpn, first, last = cost.cluster.gpus_per_node, g.first_rank, g.first_rank + g.shape.size - 1
            whole_nodes = first % gpn == 0 and g.shape.size % gpn == 0
            assert first // gpn == last // gpn or whole_nodes, "inside a node or on whole nodes"
            tokens = sum(plan.lengths[s] for s in g.seqs)
            assert tokens <= cost.tokens_capacity(g.shape.size, g.shape) + 1e-6, "memory respected"
            assert g.memory_gib <= cost.cluster.memory_gib + 1e-9
    assert abs(recompute_step(plan, cost) - plan.time_s) <= 1e-9 * plan.time_s
    assert plan.lower_bound_s <= plan.time_s * (1 + 1e-9)


TINY = [
    [30000, 2000, 1500, 800, 600, 400],
    [12000, 11000, 9000, 3000],
    [5000, 5000, 5000, 5000, 5000],
    [45000, 100, 200],
    [20000, 20000, 1000, 1000, 1000, 1000],
    [7000],
]


@pytest.mark.parametrize("lengths", TINY)
def test_equals_brute_force_on_tiny_instances(lengths):
    plan = Planner(COST, EXACT).plan(lengths)
    assert len(plan.micro_steps) == 1
    check_invariants(plan)
    opt = brute_force(lengths)
    assert plan.time_s == pytest.approx(opt, rel=1e-9)


@lru_cache(maxsize=1)
def _wiki_like(seed=0):
    rng = np.random.default_rng(seed)
    return [np.minimum(rng.lognormal(7.0, 1.3, size=64).astype(int) + 1, 60000) for _ in range(3)]


@pytest.mark.parametrize("i", range(3))
def test_never_worse_than_any_baseline(i):
    cost = CostModel(
        Cluster(
            name="c", nodes=2, gpus_per_node=4, peak_tflops=100, memory_gib=6.0, intra_gbs=100, inter_gbs=5, beta_ms=20
        ),
        MODEL,
    )
    lengths = _wiki_like()[i]
    cfg = PlannerConfig()
    plan = Planner(cost, cfg).plan(lengths)
    check_invariants(plan, cost)
    base = all_baselines(cost, lengths, cfg, plan)
    for name, t in [*base["layouts"].items(), ("ulysses_hetero", base["ulysses_hetero"])]:
        if t is not None:
            assert plan.time_s <= t * (1 + 1e-9), f"planner {plan.time_s} worse than {name} {t}"


def test_static_baseline_matches_hand_computation():
    # 4 equal sequences, static Ulysses u=2: two groups of two GPUs, two sequences each.
    lengths = np.array([4000, 4000, 4000, 4000])
    planner = Planner(COST)
    t_seq = float(COST.seq_time_s(4000.0, GroupShape(2, 1)))
    groups = COST.group_overhead_s(GroupShape(2, 1)) + 2 * t_seq
    assert static_step_s(planner, lengths, GroupShape(2, 1)) == pytest.approx(groups + fsdp_exposed(COST, groups))


def test_micro_steps_when_batch_exceeds_memory():
    cap = COST.tokens_capacity(1) * CLUSTER.world
    n = int(cap // 5000) + 4
    plan = Planner(COST).plan([5000] * n)
    assert len(plan.micro_steps) >= 2
    check_invariants(plan)


@pytest.mark.parametrize(
    ("lengths", "match"),
    [([], "empty batch"), ([100, 0], ">= 1"), ([100, -5], ">= 1"), ([10**9], "exceeds what the cluster can hold")],
)
def test_bad_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        Planner(COST).plan(lengths)


def test_bad_configs():
    with pytest.raises(ValueError, match="valid: 'full', 'selective', 'none'"):
        ModelShape(layers=1, hidden=8, heads=2, checkpointing="some")
    with pytest.raises(ValueError, match="must be > 0"):
        Cluster(memory_gib=0)
    with pytest.raises(ValueError, match="valid:"):
        PlannerConfig(strategies=("zigzag",)) and Planner(COST, PlannerConfig(strategies=("zigzag",)))


def test_million_token_plan_h100_llama3():
    cluster = Cluster(
        name="h100x64",
        nodes=8,
        gpus_per_node=8,
        peak_tflops=989,
        mfu=0.4,
        memory_gib=76,
        intra_gbs=300,
        inter_gbs=40,
        beta_ms=150,
    )
    llama = ModelShape(
        name="llama3-8b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        ffn=14336,
        vocab=128256,
        checkpointing="full",
    )
    cost = CostModel(cluster, llama)
    plan = Planner(cost).plan([1048576])
    check_invariants(plan, cost)
    assert plan.peak_memory_gib <= 76
