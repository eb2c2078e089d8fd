"""The CUDA path (flash-attn, NCCL, bf16). Skipped without a GPU and flash_attn; on a GPU box run
``pytest -m gpu`` (and ``sp-bench gpu`` for the numbers). Never run in this repository's CI (no GPU)."""

from __future__ import annotations

import pytest
import torch

from sp.kernels import flash_attn_status

_PROBLEM = "no CUDA device" if not torch.cuda.is_available() else flash_attn_status()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_PROBLEM is not None, reason=f"needs CUDA and flash-attn: {_PROBLEM}"),
]


@pytest.fixture(scope="module")
def kernel_rows():
    from benchmarks.gpu import kernel_checks

    return kernel_checks()


def test_flash_kernels_match_float64_in_bf16(kernel_rows):
    """Forward, fused backward and the varlen ring step, causal at offsets and GQA: a few bf16 roundings."""
    for row in kernel_rows:
        for key, err in row.items():
            if key.endswith("_rel_err"):
                assert err < 2e-2, f"{row['case']} {key}={err:.2e}"


def test_one_gpu_training_steps_fsdp_bf16_full_checkpointing():
    import math

    from benchmarks.gpu import training

    (row,) = training([8192], steps=2)
    assert math.isfinite(row["loss"])
    assert abs(row["act_bytes_measured"] / row["act_bytes_predicted"] - 1) <= 0.10
    assert row["state_bytes"] == row["state_bytes_predicted"]
