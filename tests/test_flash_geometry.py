"""The flash kernel's call geometry on the CPU (issue 10, items 1 and 10): FlashKernel drives a stand-in with
flash-attn's exact conventions, so every causal pair the ring produces, with any query and key offsets, must
equal the float64 reference. These run in CI (not gpu-marked)."""

from __future__ import annotations

import functools
import random

import pytest
import torch

import sp
from sp.kernels import FlashKernel, TorchKernel, flash_calls
from tests.dist import run_distributed
from tests.flash_standin import STANDINS, register
from tests.reference import check_long_segments, long_segments_worker


def _pair(nq, nk, g):
    q = torch.randn(nq, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(nk, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(nk, 2, 8, generator=g, dtype=torch.float64)
    return q, k, v


def test_flash_calls_equal_the_reference_for_any_offsets():
    rnd, g = random.Random(0), torch.Generator().manual_seed(0)
    kernel = FlashKernel(**STANDINS, half_only=False)
    cases = [(512, 512, 512, 0), (512, 1024, 512, 0), (7, 5, 0, 3), (5, 9, 20, 0), (9, 5, 0, 0)]
    cases += [(rnd.randint(1, 40), rnd.randint(1, 40), rnd.randint(0, 60), rnd.randint(0, 60)) for _ in range(200)]
    for nq, nk, q_pos, k_pos in cases:
        q, k, v = _pair(nq, nk, g)
        for mask in (True, False):
            out, lse = kernel.forward(q, k, v, q_pos, k_pos, mask, 0.3)
            ref_out, ref_lse = TorchKernel().forward(q, k, v, q_pos, k_pos, mask, 0.3)
            assert torch.allclose(out, ref_out, atol=1e-12), (nq, nk, q_pos, k_pos, mask)
            assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and not torch.isnan(lse).any()
            fin = ~torch.isinf(ref_lse)
            assert torch.allclose(lse[fin], ref_lse[fin], atol=1e-12)
            do = torch.randn(out.shape, generator=g, dtype=torch.float64)
            got = kernel.backward(do, q, k, v, ref_out, ref_lse, q_pos, k_pos, mask, 0.3)
            want = TorchKernel().backward(do, q, k, v, ref_out, ref_lse, q_pos, k_pos, mask, 0.3)
            for x, y in zip(got, want):
                assert torch.allclose(x, y, atol=1e-10), (nq, nk, q_pos, k_pos, mask)


def test_flash_calls_cover_rows_once():
    for nq, nk, q_pos, k_pos in [(512, 512, 512, 0), (100, 30, 10, 40), (30, 100, 0, 0)]:
        calls = flash_calls(nq, nk, q_pos, k_pos, True)
        rows = [r for a, b, _, _ in calls for r in range(a, b)]
        assert rows == sorted(set(rows)) and all(keys <= nk for _, _, keys, _ in calls)


def test_flash_rejects_fp32_and_ring_flash_rejects_non_causal():
    x = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="takes bf16/fp16 tensors, got torch.float32"):
        FlashKernel(**STANDINS).forward(x, x, x, 0, 0, True, 0.1)
    ctx = sp.SPContext(sp.GroupLayout.build([0, 8], 1, 2), 0, ring_global_ranks=(0, 1), kernel="ring_flash",
                       causal=False)  # fmt: skip
    with pytest.raises(ValueError, match="causal-only"):
        sp.attention(torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), ctx)


def test_flash_kernel_through_the_ring_on_long_causal_segments():
    parts = run_distributed(long_segments_worker, 2, "flash_cpu", [(1, 1), (1, 2), (2, 1)], register, timeout=180)
    check_long_segments(parts)


def test_one_step_is_at_most_two_varlen_calls():
    """Issue 10, item 6: all pairs of a ring step go to flash in one causal and one full varlen call."""
    from sp.kernels import backward_pairs, forward_pairs

    calls = {"fwd": 0, "bwd": 0}

    def counted(name, fn):
        @functools.wraps(fn)  # flash's private functions are called by parameter name
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapper

    kernel = FlashKernel(**{**STANDINS, "varlen_impl": counted("fwd", STANDINS["varlen_impl"]),
                            "varlen_backward_impl": counted("bwd", STANDINS["varlen_backward_impl"])},
                         half_only=False)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    q, k, v = _pair(300, 300, g)
    pairs = [(0, 100, 0, 100, 0, 0, True), (100, 50, 100, 60, 500, 480, True), (150, 150, 0, 300, 900, 0, False),
             (0, 100, 200, 40, 100, 20, True), (200, 60, 160, 80, 40, 0, False)]  # fmt: skip
    got = forward_pairs(kernel, q, k, v, pairs, 0.2)
    want = forward_pairs(TorchKernel(), q, k, v, pairs, 0.2)
    assert calls["fwd"] <= 2 and len(got) >= len(pairs)
    out = torch.zeros_like(q)
    lse = torch.full((4, 300), float("-inf"), dtype=torch.float64)
    ref_out, ref_lse = out.clone(), lse.clone()
    from sp.merge import merge_into

    for (rows, o, l_), tgt in ((x, (out, lse)) for x in got):
        merge_into(tgt[0][rows], tgt[1][:, rows], o, l_)
    for rows, o, l_ in want:
        merge_into(ref_out[rows], ref_lse[:, rows], o, l_)
    assert torch.allclose(out, ref_out, atol=1e-12)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    ref_grads = [torch.zeros_like(x) for x in (q, k, v)]
    backward_pairs(kernel, do, q, k, v, ref_out, ref_lse, pairs, 0.2, *grads)
    backward_pairs(TorchKernel(), do, q, k, v, ref_out, ref_lse, pairs, 0.2, *ref_grads)
    assert calls["bwd"] <= 2
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10)
