"""Worlds that are not a power of two, on gloo ranks: sp.attention on groups of 3, 5, 6 and 12 ranks (every
Ulysses x ring split the heads allow, two groups at once) against the float64 reference; the GroupPool making
groups on demand within its bound; the trainer on 3 and on 6 ranks (2 nodes x 3) against one process."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from tests.dist import run_distributed
from tests.reference import reference_attention
from tests.test_topology import valid_placement

HEADS = {"mha": (12, 12), "gqa": (12, 6)}  # 12 q heads: Ulysses degrees 1, 2, 3, 4, 6, 12 (gqa: not 4)
BATCHES = {"long_tail": [3, 100, 7, 40, 1, 9], "odd": [13, 29, 2]}
D = 8
WORLDS = {  # world -> micro-steps, each a list of groups (ranks, u, r)
    3: [[((0, 1, 2), 1, 3)], [((0, 1, 2), 3, 1)], [((0,), 1, 1), ((1, 2), 2, 1)]],
    5: [[((0, 1, 2, 3, 4), 1, 5)], [((0, 1, 2), 3, 1), ((3, 4), 1, 2)]],
    6: [[((0, 1, 2, 3, 4, 5), u, 6 // u)] for u in (1, 2, 3, 6)] + [[((0, 1, 2), 1, 3), ((3, 4, 5), 3, 1)]],
    12: [[(tuple(range(12)), u, 12 // u)] for u in (1, 2, 3, 4, 6, 12)]
    + [[(tuple(range(6)), 2, 3), (tuple(range(6, 11)), 1, 5), ((11,), 1, 1)]],
}


def _inputs(batch: str, heads: str) -> tuple[list[int], list[torch.Tensor]]:
    lens = BATCHES[batch]
    g = torch.Generator().manual_seed(zlib.crc32(f"{batch}-{heads}".encode()))
    h, hk = HEADS[heads]
    t = sum(lens)
    q, do = (torch.randn(t, h, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(t, hk, D, generator=g, dtype=torch.float64) for _ in range(2))
    return [0, *np.cumsum(lens).tolist()], [q, k, v, do]


def _allowed(heads: str, u: int) -> bool:
    h, hk = HEADS[heads]
    return h % u == 0 and (hk % u == 0 or u % hk == 0)


def _attention_worker(rank, world):
    import sp

    pool = sp.GroupPool(max_per_rank=3)  # the least the pool allows: groups are destroyed and made again
    out, held = {}, []
    for rounds in range(2):  # the second round finds the first's groups destroyed and makes them again
        for i, groups in enumerate(WORLDS[world]):
            pool.prepare([(ranks, u) for ranks, u, _ in groups])
            held.append(pool.held())
            mine = next(g for g in groups if rank in g[0])
            ranks, u, r = mine
            for batch in BATCHES:
                for causal in (True, False):
                    for heads in (h for h in HEADS if _allowed(h, u)):
                        cu, (q, k, v, do) = _inputs(batch, heads)
                        ctx = pool.context(ranks, u, r, cu, causal=causal)
                        ql, kl, vl = (sp.shard(x, ctx.layout, ctx.rank).requires_grad_() for x in (q, k, v))
                        o = sp.attention(ql, kl, vl, ctx)
                        o.backward(sp.shard(do, ctx.layout, ctx.rank))
                        key = (rounds, i, batch, causal, heads)
                        out[key] = (ranks, ctx.rank, [x.detach() for x in (o, ql.grad, kl.grad, vl.grad)])
    if world == 6:
        out["split"] = _comm_split_standin(rank)
    return out, held, pool.created, pool.destroyed


SPLIT_STEPS = ([((0, 1, 2), 1, 3), ((3, 4, 5), 3, 1)], [(tuple(range(6)), 2, 3)])


def _comm_split_standin(rank):
    """The NCCL path: torch's split_group (ncclCommSplit) replaced by a stand-in with its contract (every
    rank calls it with the same disjoint lists; this rank's group back, None outside them), built on gloo
    new_group. The pool must make one split per kind and micro-step, and attention on its groups stays exact."""
    import torch.distributed as dist

    import sp
    import sp.groups

    calls = []

    def split_group(parent_pg=None, split_ranks=None, **kw):
        flat = [r for ranks in split_ranks for r in ranks]
        assert len(flat) == len(set(flat)), f"split lists overlap: {split_ranks}"
        calls.append([tuple(r) for r in split_ranks])
        made = [dist.new_group(list(r)) for r in split_ranks]
        return next((g for g, r in zip(made, split_ranks) if rank in r), None)

    saved = (sp.groups._can_split, getattr(dist, "split_group", None))
    sp.groups._can_split, dist.split_group = (lambda: True), split_group
    try:
        pool = sp.GroupPool(max_per_rank=3)
        errors = []
        for groups in SPLIT_STEPS:
            pool.prepare([(ranks, u) for ranks, u, _ in groups])
            ranks, u, r = next(g for g in groups if rank in g[0])
            cu, (q, k, v, do) = _inputs("odd", "mha")
            ctx = pool.context(ranks, u, r, cu)
            ql, kl, vl = (sp.shard(x, ctx.layout, ctx.rank).requires_grad_() for x in (q, k, v))
            o = sp.attention(ql, kl, vl, ctx)
            errors.append(o.detach())
        return calls, errors
    finally:
        sp.groups._can_split, dist.split_group = saved[0], saved[1]


class _Lazy(dict):
    """World -> its ranks' results, spawned when a test first asks (world 12 only in the slow suite)."""

    def __missing__(self, world):
        self[world] = run_distributed(_attention_worker, world, timeout=600)
        return self[world]


@pytest.fixture(scope="module")
def attention_runs():
    return _Lazy()


SIZES = [w if w in (3, 6) else pytest.param(w, marks=pytest.mark.slow) for w in WORLDS]  # 5 and 12: slow


@pytest.mark.parametrize("world", SIZES)
def test_attention_on_groups_of_any_size_equals_float64(attention_runs, world):
    import sp
    from sp.layout import GroupLayout

    res = attention_runs[world]
    keys = {key for part in res for key in part[0] if key != "split"}
    assert {k[1] for k in keys} == set(range(len(WORLDS[world]))), "every micro-step ran"
    for key in sorted(keys, key=str):
        _, i, batch, causal, heads = key
        cu, (q, k, v, do) = _inputs(batch, heads)
        q64, k64, v64 = (x.clone().requires_grad_() for x in (q, k, v))
        out = reference_attention(q64, k64, v64, cu, causal)
        out.backward(do)
        ref = (out.detach(), q64.grad, k64.grad, v64.grad)
        for ranks, u, r in WORLDS[world][i]:
            if not _allowed(heads, u):
                continue
            layout = GroupLayout.build(cu, u, r)
            for j, name in enumerate(("out", "dq", "dk", "dv")):
                got = sp.unshard([res[g][0][key][2][j] for g in ranks], layout)
                err = (got - ref[j]).abs().max().item()
                assert err <= 1e-10, f"{key} group {ranks} u{u}r{r} {name}: max abs error {err:.3e}"


@pytest.mark.parametrize("world", SIZES)
def test_pool_stays_within_its_bound(attention_runs, world):
    for rank, (_, held, _, _) in enumerate(attention_runs[world]):
        assert max(held) <= 3, f"rank {rank} held {max(held)} communicators"
    created = [c for _, _, c, _ in attention_runs[world]]
    assert len(set(created)) == 1, "every rank made the same groups"
    if world in (6, 12):
        assert attention_runs[world][0][3] > 0, "least recently used groups were destroyed"


def test_comm_split_path_makes_one_split_per_kind(attention_runs):
    import sp
    from sp.layout import GroupLayout

    res = attention_runs[6]
    calls, _ = res[0][0]["split"]
    assert calls == [
        [(0, 1, 2), (3, 4, 5)],  # micro-step 1: both SP groups in one split (their sub-groups are themselves)
        [(0, 1, 2, 3, 4, 5)],  # micro-step 2: the SP group, its Ulysses pairs, its rings of 3
        [(0, 1), (2, 3), (4, 5)],
        [(0, 2, 4), (1, 3, 5)],
    ]
    cu, (q, k, v, _) = _inputs("odd", "mha")
    ref = reference_attention(q, k, v, cu, True)
    for i, groups in enumerate(SPLIT_STEPS):
        for ranks, u, r in groups:
            got = sp.unshard([res[g][0]["split"][1][i] for g in ranks], GroupLayout.build(cu, u, r))
            assert (got - ref.detach()).abs().max().item() <= 1e-10


STEPS = 3


def _job(out, world, strategy, sp_size=0, gpus_per_node=None):
    from dataclasses import replace

    from tests.test_trainer import _job as base

    job = base(out, strategy, STEPS, use_milp=strategy == "adaptive")
    cluster = replace(job.cluster, gpus_per_node=gpus_per_node or world)
    return replace(job, cluster=cluster, train=replace(job.train, sp_size=sp_size, picture_every=0, memory_every=0))


RUNS = {  # world -> (ranks per node, [(name, strategy, sp_size)])
    3: (3, [("adaptive", "adaptive", 0), ("ring3", "ring", 3), ("ulysses2_idle1", "ulysses", 2)]),
    6: (3, [("adaptive", "adaptive", 0), ("ring6", "ring", 6), ("ring3_x2", "ring", 3)]),
}


def _trainer_worker(rank, world, tmp):
    import os

    from tests.test_trainer import _params
    from trainer.loop import Trainer

    per_node, runs = RUNS[world]
    os.environ["LOCAL_WORLD_SIZE"] = str(per_node)  # a torchrun launch of world / per_node nodes
    out = {}
    for name, strategy, sp_size in runs:
        tr = Trainer(_job(f"{tmp}/{world}/{name}", world, strategy, sp_size, per_node))
        plans = []
        original = tr._plan

        def spy(lengths, original=original, plans=plans):
            plan = original(lengths)
            plans.append(plan)
            return plan

        tr._plan = spy  # rank 0 plans (and broadcasts): its record is the run's
        losses = tr.run()
        groups = [[g.ranks for g in m.groups] for p in plans for m in p.micro_steps]
        out[name] = (losses, _params(tr.model), (tr.job.cluster.nodes, tr.job.cluster.gpus_per_node), groups)
    return out


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    from tests.test_trainer import _reference

    tmp = str(tmp_path_factory.mktemp("any_world"))
    ref = run_distributed(_reference, 1, timeout=300)[0]
    return ref, {world: run_distributed(_trainer_worker, world, tmp, timeout=900) for world in RUNS}


@pytest.mark.parametrize(("world", "name"), [(w, n) for w, (_, runs) in RUNS.items() for n, _, _ in runs])
def test_trainer_on_any_world_matches_one_process(trainer_runs, world, name):
    (ref_losses, ref_params), runs = trainer_runs
    losses, params, topology, groups = runs[world][0][name]
    assert topology == (world // RUNS[world][0], RUNS[world][0]), "nodes and GPUs per node from the launch"
    assert all(math.isfinite(x) for x in losses)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    worst = max((params[k] - ref_params[k]).abs().max().item() for k in ref_params)
    assert worst <= 1e-5, f"parameters differ by {worst:.2e}"
    assert groups, "rank 0 recorded its plans"
    if name == "ulysses2_idle1":
        assert all(g == [(0, 1)] for g in groups), "one group of 2 on a node of 3: rank 2 runs empty passes"
    if name == "ring3_x2":
        assert all(g == [(0, 1, 2), (3, 4, 5)] for g in groups), "a group on each node"
    nodes, per_node = topology
    for g in groups:  # inside a node or on whole nodes of the launched topology
        valid_placement(nodes, per_node, [len(r) for r in g], [r[0] for r in g])
