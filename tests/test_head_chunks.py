"""Ulysses head chunks (``planner.head_chunks``): exact against the float64 reference for every chunk count,
and the all-to-all buffers in flight, counted by ``sp.ulysses.CommBuffers``, equal the memory model's
``CostModel.ulysses_buffer_bytes``: one chunk each way, so more chunks hold less."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.reference import reference_attention

WORLD, D = 4, 8
HEADS = {"mha": (8, 8), "gqa": (8, 4)}
BATCHES = {"long_tail": [3, 100, 7, 40, 1, 9], "single": [160]}  # several sequences (a receive permutation), one
CASES = [(u, 4 // u, heads, batch, n) for u in (4, 2) for heads in HEADS for batch in BATCHES for n in (1, 2, 4)]


def _inputs(batch, heads):
    g = torch.Generator().manual_seed(7)
    t, (h, hk) = sum(BATCHES[batch]), HEADS[heads]
    q, do = (torch.randn(t, h, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(t, hk, D, generator=g, dtype=torch.float64) for _ in range(2))
    cu = [0]
    for n in BATCHES[batch]:
        cu.append(cu[-1] + n)
    return cu, (q, k, v, do)


def _worker(rank, world):
    import sp
    from sp.ulysses import CommBuffers

    pool, out = sp.GroupPool(), {}
    for case in CASES:
        u, r, heads, batch, n = case
        cu, tensors = _inputs(batch, heads)
        meter = CommBuffers()
        ctx = pool.context(tuple(range(world)), u, r, cu, head_chunks=n, comm_buffers=meter)
        ql, kl, vl, dol = (sp.shard(x.float(), ctx.layout, ctx.rank) for x in tensors)
        ql, kl, vl = (x.requires_grad_() for x in (ql, kl, vl))
        o = sp.attention(ql, kl, vl, ctx)
        o.backward(dol)
        out[case] = ([x.detach() for x in (o, ql.grad, kl.grad, vl.grad)], meter.peak, meter.live,
                     ctx.layout.local_tokens, ctx.gather_perm is not None)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, WORLD, timeout=300)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_exact_and_buffers_are_the_models(runs, case):
    import sp
    from planner.cost import CostModel
    from planner.types import Cluster, ModelShape

    u, r, heads, batch, n = case
    cu, (q, k, v, do) = _inputs(batch, heads)
    layout = sp.GroupLayout.build(cu, u, r)
    got = [sp.unshard([runs[g][case][0][i] for g in range(WORLD)], layout).double() for i in range(4)]
    q64, k64, v64 = (x.float().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, cu)
    ref.backward(do.float().double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, (ref, q64.grad, k64.grad, v64.grad), strict=True):
        assert (a - b).abs().max().item() <= 1e-5, (name, case)
    h, hk = HEADS[heads]
    shape = ModelShape(name="t", layers=1, hidden=h * D, heads=h, kv_heads=hk, head_dim=D, bytes_per_value=4,
                       head_chunks=n)  # fmt: skip
    per_token = CostModel(Cluster(name="cpu", nodes=1, gpus_per_node=WORLD), shape).ulysses_buffer_bytes(u)
    for rank in range(WORLD):
        _, peak, live, local, perm = runs[rank][case]
        assert live == 0, (rank, live)  # every buffer taken by the end of backward
        if perm:  # the output goes back through a permuted copy: exactly the model's bytes
            assert peak == per_token * local, (rank, peak, per_token * local)
        else:  # one sequence: the kernel's output is sent as it is (no copy), so at most the model's
            assert 0 < peak <= per_token * local, (rank, peak, per_token * local)


def test_more_chunks_hold_fewer_bytes(runs):
    peaks = {n: runs[0][(2, 2, "mha", "long_tail", n)][1] for n in (1, 2, 4)}
    assert peaks[4] < peaks[2] < peaks[1], peaks


def test_planner_chunks_heads_only_where_memory_needs_it():
    """``planner.head_chunks`` as a per-micro-step choice: more chunks cost latency (more, smaller collectives),
    so only the micro-step of a sequence that does not fit otherwise (Ulysses only) uses them."""
    from planner.cost import CostModel
    from planner.planner import Planner, PlannerConfig
    from planner.types import Cluster, GroupShape, MemoryMode, ModelShape

    shape = ModelShape(name="mha", layers=4, hidden=1024, heads=8, kv_heads=8, head_dim=128, ffn=2816, vocab=1024,
                       head_chunks=1)  # fmt: skip
    cluster = Cluster(name="two", nodes=1, gpus_per_node=2, peak_tflops=100.0, mfu=0.5, memory_gib=4.0,
                      intra_gbs=100.0, inter_gbs=100.0, beta_ms=50.0)  # fmt: skip
    cost = CostModel(cluster, shape)
    chunked = cost.with_mode(MemoryMode("full", 0, 0, 4))
    u2 = GroupShape(2, 1)
    assert chunked.collectives(u2) == 4 * cost.collectives(u2)  # the time cost: 4x the all-to-alls
    long = int(0.99 * chunked.tokens_capacity(2, u2))
    assert cost.tokens_capacity(2, u2) < long  # it needs the chunks
    shorts = [int(cost.tokens_capacity(1, GroupShape(1, 1)) * 0.4)] * 4
    config = PlannerConfig(strategies=("none", "ulysses"), head_chunks=(4,), use_milp=False)
    plan = Planner(cost, config).plan([long, *shorts])
    used = {s: m.mode(shape).head_chunks for m in plan.micro_steps for g in m.groups for s in g.seqs}
    assert used[0] == 4 and all(used[s] == 1 for s in range(1, 5)), used
