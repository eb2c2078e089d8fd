"""The CUDA path on one GPU: every fused attention kernel this machine has (torch's flash and cuDNN ops, which
need only torch's CUDA build; flash-attn when it loads) against float64, and training steps per memory
technique. Skipped without CUDA; ``make gpu-check`` runs it, then ``sp-bench gpu`` for the numbers."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def status():
    from benchmarks.gpu import installed

    return installed()


def test_torch_flash_runs_with_torch_alone(status):
    """torch's own flash varlen op is in every CUDA build of torch: the default needs no compiled extension."""
    assert status["torch_flash"] is None, status


@pytest.mark.parametrize("name", ["torch_flash", "cudnn", "flash"])
def test_kernel_matches_float64_in_bf16(status, name):
    """Through sp.attention on a varlen causal GQA batch at 4K and 16K tokens (forward and backward), and the
    block checks of single pairs (offsets, rows that see no key) and one batched ring step: a few bf16
    roundings."""
    from benchmarks.gpu import kernel_checks, kernel_sweep
    from sp.kernels import get_kernel

    if status[name] is not None:
        pytest.skip(f"{name}: {status[name]}")
    rows = list(kernel_sweep(name, lengths=(4096, 16384), repeats=1)) + kernel_checks("cuda", get_kernel(name))
    for row in rows:
        for key, err in row.items():
            if key.endswith("_rel_err"):
                assert err < 2e-2, f"{row['case']} {key}={err:.2e}"


def test_training_steps_per_memory_technique():
    from benchmarks.gpu import training

    for row in training([8192], steps=2, techniques=("full", "offload", "loss_chunk")):
        assert math.isfinite(row["loss"]), row["case"]
        assert abs(row["act_bytes_measured"] / row["act_bytes_predicted"] - 1) <= 0.10, row
        assert row["state_bytes"] == row["state_bytes_predicted"], row
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
