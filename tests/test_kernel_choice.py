"""Which attention kernel runs: resolution knows the device and the dtype, a setting names one, CUDA without a
fused kernel refuses (naming the memory the reference would take) instead of crawling, ``auto`` picks the
fastest exact kernel; evaluation runs under training's autocast."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.dist import run_distributed
from trainer.kernel_choice import choose

CUDA = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU
SHAPE = dict(max_len=131072, heads=32, kv_heads=8, head_dim=128)


def test_cpu_resolution():
    assert choose("auto", torch.device("cpu"), torch.float32, **SHAPE).name == "cpu_fused"
    assert choose("torch", torch.device("cpu"), torch.bfloat16, **SHAPE).name == "torch"
    with pytest.raises(ValueError, match=r"train.kernel='cudnn' needs CUDA; valid on the CPU"):
        choose("cudnn", torch.device("cpu"), torch.bfloat16, **SHAPE)


def test_fp32_on_cuda_is_refused_with_the_reference_memory():
    # scores and their softmax, fp32: 2 x 512 rows x 131072 keys x 32 heads x 4 bytes = 16 GiB
    with pytest.raises(ValueError, match=r"no fused attention kernel takes torch.float32 on CUDA.*16.0 GiB"):
        choose("auto", CUDA, torch.float32, **SHAPE)
    with pytest.raises(ValueError, match=r"train.kernel='torch_flash' takes bf16/fp16.*train.precision=bf16"):
        choose("torch_flash", CUDA, torch.float32, **SHAPE)
    assert choose("torch", CUDA, torch.float32, **SHAPE).name == "torch"  # named: accepted, at that memory


def test_auto_on_cuda_takes_the_fastest_exact_kernel():
    times = {"cudnn": 0.2, "torch_flash": 0.3, "flash": None}
    got = choose("auto", CUDA, torch.bfloat16, probe=times.get, **SHAPE)
    assert got.name == "cudnn" and "flash n/a" in got.why and "torch_flash 300.00 ms" in got.why
    with pytest.raises(ValueError, match="no fused attention kernel runs on this GPU"):
        choose("auto", CUDA, torch.bfloat16, probe=lambda n: None, **SHAPE)
    assert choose("torch_fa3", CUDA, torch.bfloat16, **SHAPE).name == "torch_fa3"  # named: no probe


def test_unknown_kernel_setting_names_the_valid_ones():
    from trainer.config import TrainConfig

    with pytest.raises(ValueError, match=r"train.kernel='xla'; valid: \['auto', 'torch', 'cpu_fused', 'torch_flash'"):
        TrainConfig(kernel="xla")


def test_exactness_check_catches_a_wrong_mask_alignment():
    """The check ``auto`` runs before timing: a kernel whose causal alignment is wrong fails it by far."""
    from sp.kernels import KERNELS, TorchFlashKernel, top_left_calls
    from tests import aten_standins
    from trainer.kernel_choice import exactness

    class Misaligned(TorchFlashKernel):
        def calls(self, nq, nk, q_pos, k_pos, mask):
            return top_left_calls(nq, nk, q_pos, k_pos, mask)  # the op aligns bottom-right

    aten_standins.register()
    KERNELS["misaligned_cpu"] = partial(Misaligned, None, half_only=False)
    try:
        cpu = torch.device("cpu")
        good = exactness("torch_flash_cpu", cpu, torch.float32, 4, 2, 16, lengths=(40, 64, 97))
        bad = exactness("misaligned_cpu", cpu, torch.float32, 4, 2, 16, lengths=(40, 64, 97))
    finally:
        del KERNELS["misaligned_cpu"]
    assert max(good.values()) < 1e-5 and max(bad.values()) > 5e-2, (good, bad)


def _eval_worker(rank, world, tmp):
    """Replicated bf16 (autocast over fp32 parameters) evaluated with a half-only kernel: the evaluation must run
    under the same autocast as training, or the kernel gets fp32 inputs and refuses them."""
    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from sp.kernels import KERNELS, TorchFlashKernel
    from tests import aten_standins
    from trainer.config import DataConfig, TrainConfig
    from trainer.kernel_choice import KernelChoice
    from trainer.loop import Trainer, TrainJob

    aten_standins.register()
    KERNELS["torch_flash_half_cpu"] = partial(TorchFlashKernel, None, half_only=True)
    shape = ModelShape(name="tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
                       bytes_per_value=2)  # fmt: skip
    job = TrainJob(model=shape, cluster=Cluster(name="cpu", nodes=1, gpus_per_node=world, memory_gib=4.0),
                   planner=PlannerConfig(use_milp=False), data=DataConfig(max_len=256, tokens_per_step=512, seed=1),
                   train=TrainConfig(steps=1, out_dir=tmp, progress=False, checkpoint_every=0, resume=False,
                                     picture_every=0, precision="bf16", sharding="replicate"))  # fmt: skip
    tr = Trainer(job)
    docs = tr.loader.next_step()
    fused = tr.evaluate(docs).loss
    tr.kernel = KernelChoice("torch_flash_half_cpu", "test: a half-precision-only kernel")
    try:
        half = tr.evaluate(docs).loss
    except ValueError as e:
        half = str(e)
    tr.lock.release()
    return fused, half


def test_evaluation_runs_under_trainings_autocast(tmp_path):
    ((fused, half),) = run_distributed(_eval_worker, 1, str(tmp_path), timeout=300)
    assert isinstance(half, float), half  # before: "kernel 'torch_flash' takes bf16/fp16 tensors, got torch.float32"
    assert abs(half - fused) < 2e-2 * abs(fused), (half, fused)
