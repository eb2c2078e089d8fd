"""sp.attention against a float64 per-sequence reference: outputs and dq/dk/dv, on 1, 2 and 4 gloo ranks."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from tests.dist import run_distributed
from tests.reference import reference_attention

BATCHES = {
    "equal": [16, 16, 16, 16],
    "long_tail": [3, 100, 7, 40, 1, 9],
    "tiny": [1, 3],
    "odd": [13, 29],
    "single_long": [203],
    "many_short": [random.Random(0).randint(1, 12) for _ in range(50)],
}
STRATEGIES = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)], 8: [(8, 1), (1, 8), (4, 2), (2, 4)]}
SLOW_BATCHES = ("long_tail", "tiny", "odd")
HEADS = {"mha": (8, 8), "gqa": (8, 2)}
D = 8


def _cases(world):
    for u, r in STRATEGIES[world]:
        for batch in SLOW_BATCHES if world == 8 else BATCHES:
            for causal in (True, False):
                for heads in HEADS:
                    dtypes = ["float64", "float32"] if (causal and heads == "gqa" and world < 8) else ["float64"]
                    for dtype in dtypes:
                        yield (world, u, r, batch, causal, heads, dtype)


def _inputs(batch, heads, dtype):
    lens = BATCHES[batch]
    g = torch.Generator().manual_seed(zlib.crc32(f"{batch}-{heads}".encode()))
    t = sum(lens)
    h, hk = HEADS[heads]
    dt = getattr(torch, dtype)
    q = torch.randn(t, h, D, generator=g, dtype=torch.float64)
    k = torch.randn(t, hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(t, hk, D, generator=g, dtype=torch.float64)
    do = torch.randn(t, h, D, generator=g, dtype=torch.float64)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu, [x.to(dt) for x in (q, k, v, do)]


def _worker(rank, world):
    import sp

    pool = sp.GroupPool()
    results = {}
    for case in _cases(world):
        _, u, r, batch, causal, heads, dtype = case
        cu, (q, k, v, do) = _inputs(batch, heads, dtype)
        ctx = pool.context(tuple(range(world)), u, r, cu, causal=causal)
        ql, kl, vl = (sp.shard(x, ctx.layout, ctx.rank).requires_grad_() for x in (q, k, v))
        out = sp.attention(ql, kl, vl, ctx)
        out.backward(sp.shard(do, ctx.layout, ctx.rank))
        results[case] = [x.detach() for x in (out, ql.grad, kl.grad, vl.grad)]
    errors = {}
    bad = [("heads", (6, 6), [0, 8]), ("kvheads", (8, 3), [0, 8])]
    for name, (h, hk), cu in bad:
        try:
            ctx = pool.context(tuple(range(world)), world, 1, cu)
            n = ctx.layout.local_tokens
            sp.attention(torch.zeros(n, h, D), torch.zeros(n, hk, D), torch.zeros(n, hk, D), ctx)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    try:  # rank 0 disagrees on the batch: every rank must raise, nobody hangs
        pool.context(tuple(range(world)), 1, world, [0, 8] if rank == 0 else [0, 4, 8])
        errors["mismatch"] = None
    except ValueError as e:
        errors["mismatch"] = str(e)
    try:
        ctx = pool.context(tuple(range(world)), 1, world, [0, 8])
        sp.attention(torch.zeros(3, 2, D), torch.zeros(3, 2, D), torch.zeros(3, 2, D), ctx)
        errors["tokens"] = None
    except ValueError as e:
        errors["tokens"] = str(e)
    return results, errors


@pytest.fixture(scope="module")
def runs():
    return {w: run_distributed(_worker, w, timeout=240) for w in (1, 2, 4)}


@pytest.fixture(scope="module")
def runs8():
    return {8: run_distributed(_worker, 8, timeout=400)}


ALL = [c for w in (1, 2, 4) for c in _cases(w)]


@pytest.mark.parametrize("case", ALL, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(runs, case):
    _check_case(runs, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases(8)), ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_world8(runs8, case):
    _check_case(runs8, case)


def _check_case(runs, case):
    import sp

    world, u, r, batch, causal, heads, dtype = case
    cu, (q, k, v, do) = _inputs(batch, heads, dtype)
    layout = sp.GroupLayout.build(cu, u, r)
    per_rank = [runs[world][g][0][case] for g in range(world)]
    got = [sp.unshard([p[i] for p in per_rank], layout).double() for i in range(4)]
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, cu, causal)
    ref.backward(do.double())
    tol = 1e-10 if dtype == "float64" else 1e-5
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, (ref, q64.grad, k64.grad, v64.grad)):
        err = (a - b).abs().max().item()
        assert err <= tol, f"{name} max abs error {err:.3e} > {tol}"


@pytest.mark.parametrize("world", [2, 4])
def test_bad_inputs_raise_on_every_rank(runs, world):
    for rank in range(world):
        errors = runs[world][rank][1]
        if world == 4:
            assert "valid Ulysses degrees" in errors["heads"] and "q heads=6" in errors["heads"]
        assert "multiple of kv heads" in errors["kvheads"]
        assert "disagree" in errors["mismatch"]
        assert "local tokens" in errors["tokens"]
