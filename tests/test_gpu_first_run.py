"""Issue 23: failures the CUDA path would hit on its first run, found by reading flash-attn 2.8.3's source.
The stand-ins (tests/flash_standin.py) wrap the private backward functions in ``torch.library.custom_op`` as
flash-attn does, so these run on the CPU what the GPU would run."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from sp.kernels import FlashKernel, TorchKernel, flash_attn_status, flash_calls, get_kernel, parameter_names
from tests.flash_standin import STANDINS, _flash_attn_backward, _flash_attn_varlen_backward


def test_custom_op_parameters_are_read_from_the_wrapped_function():
    """Item 1: a custom op's own signature is (*args, **kwargs); the real names come from the op."""
    import inspect

    assert str(inspect.signature(_flash_attn_backward)) == "(*args, **kwargs)"
    names = parameter_names(_flash_attn_backward)
    assert {"dout", "softmax_lse", "dq", "window_size_left", "softcap", "deterministic", "rng_state"} <= names
    assert {"cu_seqlens_q", "max_seqlen_k"} <= parameter_names(_flash_attn_varlen_backward)
    assert "window_size" not in names  # flash-attn <= 2.6's name is not passed to 2.8
    with pytest.raises(TypeError, match="cannot read the parameter names"):
        parameter_names(lambda *a, **k: None)


def test_fused_backward_through_custom_ops_equals_reference():
    g = torch.Generator().manual_seed(0)
    q, do = torch.randn(40, 4, 8, generator=g, dtype=torch.float64), torch.randn(40, 4, 8, generator=g)
    k, v = (torch.randn(50, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    do = do.double()
    ref_out, ref_lse = TorchKernel().forward(q, k, v, 30, 0, True, 0.3)
    got = FlashKernel(**STANDINS, half_only=False).backward(do, q, k, v, ref_out, ref_lse, 30, 0, True, 0.3)
    want = TorchKernel().backward(do, q, k, v, ref_out, ref_lse, 30, 0, True, 0.3)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)


def test_gpu_benchmark_kernel_check_on_cpu_standins():
    """Items 2 and 3: ``sp-bench gpu``'s kernel check, run on the CPU with the stand-ins in bf16: results are
    merged per row before comparing (not zipped per call), and lse errors are finite."""
    from benchmarks.gpu import kernel_checks

    rows = kernel_checks("cpu", FlashKernel(**STANDINS, half_only=False), heads=(8, 2), dim=32, shrink=8)
    assert len(rows) == 5
    for row in rows:
        for key, val in row.items():
            if key.endswith("_err"):
                assert math.isfinite(val), (row["case"], key, val)
            if key.endswith("_rel_err"):
                assert val < 2e-2, (row["case"], key, val)
        assert row["lse_inf_rows_match"], row["case"]
    no_key = next(r for r in rows if r["case"].endswith("/q0k25/causal"))  # rows 0-24 see no key
    assert no_key["lse_max_abs_err"] < 0.05  # the case with rows that see no key: -inf - -inf no longer NaN


def test_a_diagonal_tile_is_one_causal_call():
    assert flash_calls(511, 511, 0, 0, True) == [(0, 511, 511, True)]
    assert flash_calls(512, 512, 1024, 1024, True) == [(0, 512, 512, True)]
    assert flash_calls(8, 4, 4, 0, True) == [(0, 8, 4, False)]  # every query after every key: unmasked


def test_flash_ring_pairs_are_whole_and_gathers_linear():
    """Whole pairs for flash (no 512-row tiles with their own key prefixes); consecutive runs are views; one
    long sequence's ring steps need no gather at all (joined pairs are one contiguous varlen entry)."""
    import sp
    from sp.kernels.varlen import Rows
    from sp.ring import step_pairs

    kernel = FlashKernel()
    layout = sp.GroupLayout.build([0, 8192, 9000], 1, 2)
    ctx = sp.SPContext(layout, 0, ring_global_ranks=(0, 1))
    for src in range(2):
        pairs = step_pairs(ctx, src, kernel)
        assert len(pairs) <= 4 * 2  # at most (2 q chunks x 2 k chunks) per sequence
        gathered = sum(c.k.host_index.numel() for c in kernel.pack_step(pairs).calls if c.k.host_index is not None)
        assert gathered <= 2 * layout.local_tokens  # a zigzag key chunk meets at most both query chunks
    one = sp.SPContext(sp.GroupLayout.build([0, 8192], 1, 4), 1, ring_global_ranks=(0, 1, 2, 3))
    for src in range(4):
        for c in kernel.pack_step(step_pairs(one, src, kernel)).calls:
            assert c.q.span is not None and c.k.span is not None, (src, c.entries)
    assert Rows.of([(0, 5), (5, 3)]).span == slice(0, 8)
    assert Rows.of([(0, 5), (0, 3)]).host_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_abi_broken_flash_attn_is_named(tmp_path, monkeypatch):
    """Item 4: a flash-attn built against another torch passes find_spec, then fails at import with an
    undefined symbol: the kernel lookup names that and the rebuild command."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "flash_attn_interface.py").write_text(
        "raise ImportError('/x/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
        "_ZN3c104cuda9SetDeviceEi')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m.startswith("flash_attn")]:
        monkeypatch.delitem(sys.modules, mod)
    flash_attn_status.cache_clear()
    try:
        problem = flash_attn_status()
        assert problem is not None and "built against another torch" in problem and "--no-build-isolation" in problem
        with pytest.raises(ValueError, match="built against another torch"):
            get_kernel("flash")
    finally:
        flash_attn_status.cache_clear()
        for mod in [m for m in sys.modules if m.startswith("flash_attn")]:
            sys.modules.pop(mod)


def test_nvml_not_supported_never_crashes_a_step(monkeypatch):
    from trainer.observe import GpuMonitor

    class NotSupported(Exception):
        pass

    def unsupported(_):
        raise NotSupported("Not Supported")

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: object(),
        nvmlDeviceGetUtilizationRates=unsupported,  # what MIG slices answer
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2**30),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    mon = GpuMonitor(local_rank=0)
    assert mon.read() == {"gpu/memory_used_gib": 1.0}
    assert mon.read() == {"gpu/memory_used_gib": 1.0}


def test_gpu_benchmark_sweep_and_table_on_cpu_standins(tmp_path):
    """``sp-bench gpu``'s kernel sweep (through sp.attention, against float64, with TFLOP/s) runs end to end on the
    CPU with torch's aten ops backed by stand-ins; its table has a row per case."""
    from benchmarks.gpu import kernel_sweep, split, table
    from tests import aten_standins

    aten_standins.register()
    assert sum(split(4096)) == 4096 and min(split(4096)) > 0
    rows = [r for name in ("torch_flash_cpu", "cudnn_cpu") for r in kernel_sweep(
        name, lengths=(512, 1024), device="cpu", heads=(4, 2), dim=16, dtype=torch.float32, repeats=1)]  # fmt: skip
    for row in rows:
        for key in ("out_rel_err", "dq_rel_err", "dk_rel_err", "dv_rel_err"):
            assert row[key] < 1e-5, (row["case"], key, row[key])
        assert row["fwd_tflops"] > 0 and row["bwd_tflops"] > 0
    text = table(rows)
    assert len(text.splitlines()) == len(rows) + 1 and "kernel/cudnn_cpu/1K" in text
    from benchmarks.gpu import write_kernel_calibration
    from planner.calibration import read

    write_kernel_calibration(rows, {"device": "cpu (stand-ins)", "torch": torch.__version__}, tmp_path / "k.json")
    doc = read(tmp_path / "k.json")
    assert set(doc["attention_tflops"]) == {"torch_flash_cpu", "cudnn_cpu"}
    at_1k = {r["kernel"]: r["fwd_tflops"] for r in rows if r["tokens"] == 1024}
    assert {k: v["fwd"] for k, v in doc["attention_tflops"].items()} == at_1k  # the longest length's speeds
