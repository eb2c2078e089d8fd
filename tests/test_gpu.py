"""CUDA kernel path (flash-attn). Skipped without a GPU and flash_attn; run with `pytest -m gpu` on a GPU box."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sp.kernels import FlashKernel, TorchKernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
        reason="needs CUDA and flash_attn (pip install '.[gpu]')",
    ),
]


@pytest.mark.parametrize(("nq", "nk", "mask"), [(256, 256, True), (256, 128, True), (128, 384, False)])
def test_flash_block_forward_matches_reference(nq, nk, mask):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(nq, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(nk, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(nk, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    out, lse = FlashKernel().forward(q, k, v, 0, 0, mask, 0.125)
    ref_out, ref_lse = TorchKernel().forward(q.double(), k.double(), v.double(), 0, 0, mask, 0.125)
    assert (out.double() - ref_out).abs().max().item() < 2e-2
    assert (lse.double() - ref_lse).abs().max().item() < 1e-2
