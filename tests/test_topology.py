"""Group sizes and placement on any topology: packing against brute force, plans against enumeration on tiny
worlds that are not a power of two, invariants and the sp-plan done-when on 3 nodes x 8 GPUs."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from planner.candidates import candidate_shapes
from planner.cost import CostModel
from planner.planner import Planner, PlannerConfig
from planner.topology import Topology
from planner.types import Cluster, ModelShape

MODEL = ModelShape(name="m", layers=8, hidden=1024, heads=8, kv_heads=2, vocab=32000, checkpointing="full")
EXACT = PlannerConfig(time_limit_s=20.0, milp_time_limit_s=5.0, max_probes=20, gap_tol=0.0)


def packable(nodes: int, gpus: int, sizes: list[int]) -> bool:
    """Brute force: groups larger than a node take whole nodes; the others fit into the remaining nodes."""
    big = sum(s // gpus for s in sizes if s > gpus)
    if big > nodes or any(s > gpus and s % gpus for s in sizes):
        return False
    small = sorted((s for s in sizes if s <= gpus), reverse=True)
    bins = [0] * (nodes - big)

    def go(i: int) -> bool:
        if i == len(small):
            return True
        for j in range(len(bins)):
            if bins[j] + small[i] <= gpus and bins[j] not in bins[:j]:  # equal loads are interchangeable
                bins[j] += small[i]
                if go(i + 1):
                    return True
                bins[j] -= small[i]
        return False

    return go(0)


def valid_placement(nodes: int, gpus: int, sizes: list[int], firsts: list[int]) -> None:
    taken: set[int] = set()
    for s, f in zip(sizes, firsts):
        ranks = set(range(f, f + s))
        assert not ranks & taken and f + s <= nodes * gpus, "disjoint, inside the world"
        taken |= ranks
        if s <= gpus:
            assert f // gpus == (f + s - 1) // gpus, f"group of {s} at {f} straddles a node"
        else:
            assert f % gpus == 0 and s % gpus == 0, f"group of {s} at {f} is not whole nodes"


def test_sizes_and_shapes():
    t = Topology(3, 8)
    assert t.sizes == (1, 2, 3, 4, 5, 6, 7, 8, 16, 24)
    assert Topology(3, 8, "powers_of_two").sizes == (1, 2, 4, 8, 16)
    assert Topology(1, 3).sizes == (1, 2, 3) and Topology(2, 3).sizes == (1, 2, 3, 6)
    shapes = {(s.ulysses, s.ring) for s in candidate_shapes(MODEL, t)}
    assert {(1, 3), (1, 5), (2, 3), (1, 6), (1, 24), (8, 3), (4, 6), (2, 12)} <= shapes  # any ring degree
    assert (8, 2) in shapes and (16, 1) not in shapes  # the heads (8) cap u
    assert all(u * r in t.sizes for u, r in shapes)
    with pytest.raises(ValueError, match="valid: \\['any', 'powers_of_two'\\]"):
        PlannerConfig(group_sizes="odd")


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 3), (1, 5), (2, 3), (2, 7), (3, 6), (3, 8), (4, 5)])
def test_placement_equals_brute_force(nodes, gpus):
    t = Topology(nodes, gpus)
    rng = random.Random(nodes * 100 + gpus)
    cases = [[rng.choice(t.sizes) for _ in range(rng.randint(1, 9))] for _ in range(400)]
    if (nodes, gpus) == (2, 7):
        cases.append([3, 3, 2, 2, 2, 2])  # first fit decreasing fails (3+3 | 2+2+2 | 2): 3+2+2 | 3+2+2 fits
    for sizes in cases:
        firsts = t.place(sizes)
        assert (firsts is not None) == packable(nodes, gpus, sizes), sizes
        if firsts is not None:
            valid_placement(nodes, gpus, sizes, firsts)


def _plans(nodes: int, gpus: int, lengths: list[int], cost: CostModel):
    """Every multiset of shapes that brute force packs, times every assignment: the best micro-step's time."""
    sizes = [*range(1, gpus + 1), *(k * gpus for k in range(2, nodes + 1))]
    by_size = {s: [(u, s // u) for u in MODEL.ulysses_degrees(s)
                   if s % u == 0 and (s <= gpus or gpus % u == 0 or u % gpus == 0)] for s in sizes}  # fmt: skip
    from planner.types import GroupShape

    best = np.inf
    for n in range(1, len(lengths) + 1):
        for combo in itertools.combinations_with_replacement(sizes, n):
            if not packable(nodes, gpus, list(combo)):
                continue
            for shapes in itertools.product(*[by_size[s] for s in combo]):
                gs = [GroupShape(u, r) for u, r in shapes]
                t = np.array([[float(cost.seq_time_s(float(L), g)) for g in gs] for L in lengths])
                fixed = np.array([cost.group_overhead_s(g) for g in gs])
                for assign in itertools.product(range(len(gs)), repeat=len(lengths)):
                    tok = np.bincount(assign, weights=lengths, minlength=len(gs))
                    if any(tok[i] > cost.tokens_capacity(g.size) for i, g in enumerate(gs)):
                        continue
                    work = np.bincount(assign, weights=t[np.arange(len(lengths)), assign], minlength=len(gs))
                    used = np.bincount(assign, minlength=len(gs)) > 0
                    best = min(best, float(np.max(np.where(used, work + fixed, 0.0))))
    return best


@pytest.mark.parametrize(
    ("nodes", "gpus", "lengths"),
    [(1, 3, [20000, 3000, 2000]), (1, 3, [9000, 9000, 9000]), (2, 3, [40000, 4000, 1000]), (1, 5, [30000, 800])],
)
def test_plan_equals_enumeration_on_worlds_not_a_power_of_two(nodes, gpus, lengths):
    cluster = Cluster(name="t", nodes=nodes, gpus_per_node=gpus, peak_tflops=100, mfu=0.5, memory_gib=11,
                      intra_gbs=100, inter_gbs=5, beta_ms=20, fsdp_comm=False)  # fmt: skip
    cost = CostModel(cluster, MODEL)
    plan = Planner(cost, EXACT).plan(lengths)
    assert len(plan.micro_steps) == 1
    for m in plan.micro_steps:
        valid_placement(nodes, gpus, [g.shape.size for g in m.groups], [g.first_rank for g in m.groups])
    assert plan.time_s == pytest.approx(_plans(nodes, gpus, lengths, cost), rel=1e-9)


def test_sp_plan_on_three_nodes_uses_every_gpu_and_has_a_static_baseline(tmp_path):
    """The done-when: sp-plan cluster.nodes=3 (24 GPUs, the mixed example batch) fills every GPU of every
    micro-step and reports a static baseline; the groups sit inside nodes or on whole nodes."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cli.plan", "cluster.nodes=3", "output.format=json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["summary"]["baselines"]["static"] is not None
    for groups in result["first_step"]["micro_steps"]:
        ranks = sorted(r for g in groups for r in range(g["ranks"][0], g["ranks"][1] + 1))
        assert ranks == list(range(24)), "every GPU busy"
        sizes = [g["ranks"][1] - g["ranks"][0] + 1 for g in groups]
        valid_placement(3, 8, sizes, [g["ranks"][0] for g in groups])


def test_powers_of_two_restriction():
    cluster = Cluster(name="t", nodes=3, gpus_per_node=8, peak_tflops=300, memory_gib=40, intra_gbs=150,
                      inter_gbs=12.5, beta_ms=20)  # fmt: skip
    lengths = np.minimum(np.random.default_rng(0).lognormal(8.5, 1.2, size=40).astype(int) + 1, 120000)
    plan = Planner(CostModel(cluster, MODEL), PlannerConfig(group_sizes="powers_of_two")).plan(lengths)
    assert all(g.shape.size & (g.shape.size - 1) == 0 for m in plan.micro_steps for g in m.groups)


def test_unmeasured_group_sizes_interpolate_on_their_side_of_the_node_boundary():
    """FlexSP's measured all-to-all table (8-GPU nodes): 6 ranks lie between 4 and 8 inside a node, 24 between
    16 and 32 across nodes; 3 ranks below the smallest measured size take it; a side with none takes its link."""
    table = {2: 119.5, 4: 104.1, 8: 96.5, 16: 10.3, 32: 5.9, 64: 4.9}
    cl = Cluster(name="c", nodes=8, gpus_per_node=8, a2a_gbs=table, intra_gbs=150.0, inter_gbs=12.5)
    cost = CostModel(cl, MODEL)
    assert cost._bw(table, 6, False) == pytest.approx((104.1 + (96.5 - 104.1) * 2 / 4) * 1e9)
    assert cost._bw(table, 24, True) == pytest.approx((10.3 + (5.9 - 10.3) * 8 / 16) * 1e9)
    assert cost._bw(table, 1, False) == pytest.approx(119.5e9) and cost._bw(table, 96, True) == pytest.approx(4.9e9)
    assert cost._bw({2: 100.0}, 24, True) == pytest.approx(12.5e9)  # nothing measured across nodes


def test_time_matrix_equals_each_shape_timed_alone():
    """The planner's [S, K] times (terms scaling as 1 / size computed once) equal seq_time_s shape by shape,
    in every memory mode and with fitted constants."""
    from planner.types import MemoryMode

    lengths = np.array([1, 100, 4096, 50000, 262144], dtype=float)
    cluster = Cluster(name="t", nodes=3, gpus_per_node=8, peak_tflops=300, memory_gib=40, p2p_gbs={2: 50.0})
    for c in (cluster, Cluster(**{**cluster.__dict__, "alpha1_ms": 5e-6, "alpha2_ms": 0.2})):
        for mode in (MemoryMode("full"), MemoryMode("offload", 2048, 8192), MemoryMode("selective")):
            cost = CostModel(c, MODEL).with_mode(mode)
            shapes = candidate_shapes(MODEL, Topology(3, 8))
            want = np.stack([np.asarray(cost.seq_time_s(lengths, sh)) for sh in shapes], axis=1)
            np.testing.assert_allclose(cost.seq_time_matrix(lengths, shapes), want, rtol=1e-12, atol=0)
