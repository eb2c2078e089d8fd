"""Single-process unit tests of the runtime's pure pieces: pair classification, the LSE merge, kernel choice."""

from __future__ import annotations

import math

import pytest
import torch

import sp
from sp.kernels import Visibility, classify, get_kernel
from sp.merge import merge_into


def test_classify_pairs():
    assert classify(0, 4, 0, 4, 100, True) == (Visibility.CAUSAL, 4)
    assert classify(8, 4, 0, 4, 100, True) == (Visibility.FULL, 4)  # keys all in the past
    assert classify(0, 4, 8, 4, 100, True) == (Visibility.SKIP, 0)  # keys all in the future
    assert classify(0, 4, 8, 4, 100, False) == (Visibility.FULL, 4)
    assert classify(0, 4, 8, 4, 10, False) == (Visibility.FULL, 2)  # keys 10, 11 are padding
    assert classify(0, 4, 12, 4, 10, False) == (Visibility.SKIP, 0)


def test_merge_matches_softmax_over_the_union_and_handles_empty_rows():
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    v1, v2 = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64)
    full = torch.softmax(torch.cat([s1, s2], 1), 1) @ torch.cat([v1, v2])
    out = (torch.softmax(s1, 1) @ v1)[:, None]  # [tokens, heads=1, dim]
    lse = torch.logsumexp(s1, 1)[None].clone()  # [heads=1, tokens]
    merge_into(out, lse, (torch.softmax(s2, 1) @ v2)[:, None], torch.logsumexp(s2, 1)[None])
    assert torch.allclose(out[:, 0], full, atol=1e-12)
    empty_out, empty_lse = torch.zeros(3, 1, 2, dtype=torch.float64), torch.full((1, 3), -math.inf, dtype=torch.float64)
    merge_into(empty_out, empty_lse, torch.zeros(3, 1, 2, dtype=torch.float64), empty_lse.clone())
    assert torch.isinf(empty_lse).all() and not torch.isnan(empty_out).any()


def test_kernel_choice_errors():
    with pytest.raises(ValueError, match="valid kernels"):
        get_kernel("xla")
    with pytest.raises(ValueError) as err:  # tests may register CPU stand-ins too: they come after these
        sp.SPContext(sp.GroupLayout.build([0, 5]), 0, kernel="xla")
    assert "valid: 'torch', 'cpu_fused', 'torch_flash', 'torch_fa3', 'torch_fa4', 'cudnn', 'flash'" in str(err.value)
    assert str(err.value).endswith("'ring_flash'")
    ctx = sp.SPContext(sp.GroupLayout.build([0, 5], 1, 1), 0, kernel="ring_flash")
    x = torch.zeros(5, 2, 8)
    with pytest.raises(ValueError, match="pure ring groups"):
        sp.attention(x, x, x, ctx)


def test_context_keeps_index_tensors_on_its_device_once():
    """Issue 10, item 7: positions and the Ulysses permutation are copied to the device once per step."""
    ctx = sp.SPContext(sp.GroupLayout.build([0, 5, 12], 2, 1), 0, device="meta")
    assert ctx.position_ids.device.type == "meta" and ctx.gather_perm.device.type == "meta"
    assert ctx.position_ids is ctx.position_ids and ctx.gather_perm is ctx.gather_perm
    one = sp.SPContext(sp.GroupLayout.build([0, 8], 2, 1), 0)  # one sequence: received rows are already in order
    assert one.gather_perm is None and torch.equal(one.layout.gather_perm, torch.arange(4 * 2))


def test_nvml_reads_the_ranks_own_gpu():
    from trainer.observe import nvml_device

    assert nvml_device(3, None) == 3
    assert nvml_device(1, "4,5,6") == 5
    assert nvml_device(0, "GPU-1a2b,GPU-3c4d") == "GPU-1a2b"
    with pytest.raises(ValueError, match="lists 2 GPUs"):
        nvml_device(2, "0,1")


def test_collectives_follow_the_backend_device(monkeypatch):
    """Issue 10, item 2: under NCCL the layout agreement runs on the GPU (NCCL has no CPU path)."""
    import sp.groups as groups

    monkeypatch.setattr(groups.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(groups.torch.cuda, "current_device", lambda: 0)
    assert groups._device_of(None) == torch.device("cuda", 0)
    monkeypatch.setattr(groups.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert groups._device_of(None) == torch.device("cpu")
