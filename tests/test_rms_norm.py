"""models.rms_norm: the values of torch's RMSNorm and of the fp64 formula, the bytes it saves (its input and an
fp32 rstd per token), and transient fp32 temporaries bounded by one tile whatever the token count."""

from __future__ import annotations

import pytest
import torch

from models.rms_norm import rms_norm
from tests.test_loss_peak import VocabBytes as DimBytes  # live bytes of the tensors with a dim of this size


def _fp64(x: torch.Tensor, w: torch.Tensor, eps: float, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps) * w64
    y.backward(g.double())
    return y.detach(), x64.grad, w64.grad


@pytest.mark.parametrize("shape, tile", [((100, 48), 32), ((37, 1, 6, 16), 8), ((5, 24), 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_torch_and_fp64(shape, tile, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype).requires_grad_(True)
    g = torch.randn(shape, generator=gen).to(dtype)
    y = rms_norm(x, w, 1e-5, tile)
    y.backward(g)
    ref = torch.nn.RMSNorm(shape[-1], eps=1e-5, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(w)
    want = ref(x.detach()).detach().double()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert float((y.detach().double() - want).abs().max() / want.abs().max()) < tol  # bf16: an ulp apart at most
    for got, want in zip((y, x.grad, w.grad), _fp64(x, w, 1e-5, g), strict=True):
        assert got.dtype == dtype
        err = float((got.detach().double() - want).abs().max() / want.abs().max())
        assert err < tol, (dtype, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temporaries_are_one_tiles_whatever_the_length(dtype):
    from planner.cost import CostModel
    from planner.types import NORM_TILE_TOKENS, Cluster, ModelShape

    h, tile = 48, 32
    peaks = []
    for tokens in (tile, 3 * tile, 7 * tile + 5):
        x = torch.randn(tokens, h).to(dtype).requires_grad_(True)
        w = torch.ones(h, dtype=dtype, requires_grad=True)
        meter = DimBytes(h)
        with meter:
            y = rms_norm(x, w, 1e-5, tile)
        peaks.append(("forward", meter.peak - y.numel() * y.element_size()))  # less the output
        g = torch.ones_like(y)
        meter = DimBytes(h)
        with meter:
            y.backward(g)
        peaks.append(("backward", meter.peak - g.numel() * g.element_size()))  # less dx
    by_phase = {p: {v for q, v in peaks if q == p} for p in ("forward", "backward")}
    assert all(len(v) == 1 for v in by_phase.values()), peaks  # independent of the token count
    shape = ModelShape(name="t", layers=1, hidden=h, heads=1, kv_heads=1, head_dim=16, ffn=32, vocab=64)
    bound = CostModel(Cluster(name="cpu"), shape).norm_tile_bytes() * tile / NORM_TILE_TOKENS
    assert max(v for _, v in peaks) <= bound, (peaks, bound)


def test_saves_its_input_and_an_fp32_rstd_only():
    saved: list[torch.Tensor] = []
    x = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    kinds = sorted((tuple(t.shape), t.dtype) for t in saved if t is not w)
    assert kinds == [((10,), torch.float32), ((10, 8), torch.bfloat16)], kinds
