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
    assert 0 < row["attention_s"] < row["step_s"][-1]  # CUDA-event spans around sp.attention, read after the sync


def test_hugging_face_load_onto_the_gpu_equals_transformers(tmp_path):
    """The loader's CUDA path (pinned staging, device shards): our model on the GPU from a Hugging Face
    folder gives transformers' per-token losses (fp32)."""
    from megatron.core import parallel_state

    import sp
    from models.attention import SPPackedSeqParams
    from models.gpt import build_meta
    from models.hf.config import shape_from_folder
    from models.hf.load import load_into
    from models.shards import materialize
    from tests.hf_models import make, reference_losses

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    hf = make(tmp_path / "hf", "llama3", attn_implementation="eager")
    shape = shape_from_folder(tmp_path / "hf")
    model = materialize(build_meta(shape, 4096), torch.device("cuda"))
    load_into(model, tmp_path / "hf", shape)
    doc = torch.randint(0, 256, (1001,))
    (ref,) = reference_losses(hf, [doc])
    ctx = sp.GroupPool().context((0,), 1, 1, [0, 1000], check=False, device="cuda")
    got = model(doc[None, :-1].cuda(), None, None, labels=doc[None, 1:].cuda(),
                packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx))[0]  # fmt: skip
    assert float((got.cpu() - ref).abs().max()) < 1e-4
