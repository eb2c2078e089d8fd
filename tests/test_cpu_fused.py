"""The fused CPU block kernel (torch's flash op, top-left causal) against the float64 reference kernel: every
offset, GQA, empty rows, bf16, and through the ring and Ulysses on long causal segments."""

from __future__ import annotations

import random

import pytest
import torch

from sp.kernels import TorchKernel
from sp.kernels.cpu_fused import CpuFusedKernel, topleft_calls
from tests.dist import run_distributed
from tests.reference import check_long_segments, long_segments_worker


def test_fused_equals_the_reference_for_any_offsets():
    ref, fused = TorchKernel(), CpuFusedKernel()
    rnd = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    empty_rows = 0
    for _ in range(150):
        nq, nk = rnd.randint(1, 90), rnd.randint(1, 90)
        h, hk, d = rnd.choice([(4, 4, 8), (4, 2, 8), (8, 2, 16)])
        q_pos, k_pos, mask = rnd.randint(0, 120), rnd.randint(0, 120), rnd.random() < 0.75
        q, do = (torch.randn(nq, h, d, generator=gen, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(nk, hk, d, generator=gen, dtype=torch.float64) for _ in range(2))
        o1, l1 = ref.forward(q, k, v, q_pos, k_pos, mask, 0.3)
        o2, l2 = fused.forward(q, k, v, q_pos, k_pos, mask, 0.3)
        seen = torch.isfinite(l1)
        assert torch.equal(seen, torch.isfinite(l2)), "rows without a visible key: lse -inf in both"
        empty_rows += int((~seen).sum())
        torch.testing.assert_close(o2, o1, rtol=0, atol=1e-12)
        torch.testing.assert_close(l2[seen], l1[seen], rtol=0, atol=1e-12)
        for a, b in zip(ref.backward(do, q, k, v, o1, l1, q_pos, k_pos, mask, 0.3),
                        fused.backward(do, q, k, v, o1, l1, q_pos, k_pos, mask, 0.3)):  # fmt: skip
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert empty_rows > 0


def test_topleft_calls_cover_exactly_the_visible_keys():
    for nq, nk, qp, kp in [(5, 9, 3, 0), (5, 9, 0, 3), (7, 3, 10, 2), (4, 4, 0, 0), (3, 8, 0, 20)]:
        seen = {(i, j) for r0, r1, k0, k1, causal in topleft_calls(nq, nk, qp, kp, True)
                for i in range(r0, r1) for j in range(k0, k1) if not causal or j - k0 <= i - r0}  # fmt: skip
        assert seen == {(i, j) for i in range(nq) for j in range(nk) if kp + j <= qp + i}


def test_bf16_close_to_fp64():
    gen = torch.Generator().manual_seed(1)
    q, do = (torch.randn(300, 4, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(500, 2, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    ref, fused = TorchKernel(), CpuFusedKernel()
    o1, l1 = ref.forward(q, k, v, 200, 0, True, 0.2)
    o2, l2 = fused.forward(*(x.bfloat16() for x in (q, k, v)), 200, 0, True, 0.2)
    assert o2.dtype == torch.float32 and l2.dtype == torch.float32  # compute dtype: the ring accumulates in fp32
    assert ((o2.double() - o1).abs().max() / o1.abs().max()).item() < 2e-2
    grads = fused.backward(*(x.bfloat16() for x in (do, q, k, v)), o2, l2, 200, 0, True, 0.2)
    for a, b in zip(ref.backward(do, q, k, v, o1, l1, 200, 0, True, 0.2), grads):
        assert b.dtype == torch.float32
        assert ((b.double() - a).abs().max() / a.abs().max()).item() < 3e-2


@pytest.mark.slow
def test_fused_kernel_through_ring_and_ulysses():
    check_long_segments(run_distributed(long_segments_worker, 2, "cpu_fused", [(1, 2), (2, 1)], timeout=180))


def test_whole_pairs_through_every_strategy_on_long_sequences():
    """World 1 (one call per pair, results taken as they come) and 4 ranks (ulysses 4, ring 4, hybrid 2x2) on
    sequences of 1024, 1500 and 300 tokens (pairs of up to 1500 rows, no 512-row tiles): fp64 reference."""
    assert CpuFusedKernel.tile_rows is None
    check_long_segments(run_distributed(long_segments_worker, 4, "cpu_fused", [(1, 1), (4, 1), (1, 4), (2, 2)],
                                        timeout=300))  # fmt: skip


def test_zigzag_ring_steps_join_their_unmasked_pairs_into_one_call():
    """With whole-pair kernels, a zigzag ring step after the first is one call (both chunk pairs share their keys
    or their queries and are unmasked); masked pairs and the reference kernel's tiles are never joined; the
    joined calls cover exactly the rows and keys of the pairs they replace."""
    import sp
    from sp.ring import _rows, block_pairs, step_pairs

    fused, ref = CpuFusedKernel(), TorchKernel()
    for i in range(4):
        ctx = sp.SPContext(sp.GroupLayout.build([0, 8192], 1, 4), i, ring_global_ranks=(0, 1, 2, 3), kernel="cpu_fused")
        for step in range(4):
            src = (i - step) % 4
            plain, joined = _rows(block_pairs(ctx, src, None)), step_pairs(ctx, src, fused)
            cover = lambda ps: {(a, b) for qs, nq, ks, nk, *_ in ps for a in range(qs, qs + nq, 256)  # noqa: E731
                                for b in range(ks, ks + nk, 256)}  # fmt: skip
            assert cover(joined) == cover(plain)
            assert len(joined) == (3 if step == 0 else 1), (i, step, joined)
            assert [p for p in joined if p[6]] == [p for p in plain if p[6]]  # masked pairs as they were
            assert step_pairs(ctx, src, ref) == _rows(block_pairs(ctx, src, ref.tile_rows))
