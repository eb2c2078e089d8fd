"""The standard FLOPs count (Megatron-LM's ``num_floating_point_operations``, PaLM's appendix) against hand counts,
the MFU of the published 1M-token Qwen3-8B run, attention timed at a kernel's stated speeds, and the planner
reaching for the memory techniques by itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cost import CostModel
from planner.types import Cluster, ModelShape

ROOT = Path(__file__).parents[1]
LLAMA3_8B = ModelShape(name="llama3-8b", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                       vocab=128256)  # fmt: skip
# Qwen3-0.6B: 16 heads x 128 = 2048-wide attention on a 1024 hidden (the attention width is not the hidden size)
QWEN3_06B = ModelShape(name="qwen3-0.6b", layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, ffn=3072,
                       vocab=151936, qk_norm=True, tie_embeddings=True)  # fmt: skip
QWEN3_8B = ModelShape(name="qwen3-8b", layers=36, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=12288,
                      vocab=151936, qk_norm=True)  # fmt: skip


def hand_count(layers, hidden, heads, kv, d, ffn, vocab, tokens):
    """6 x (non-embedding weights + the output layer) per token + 12 x 1/2 x L^2 x (heads x head_dim) per layer,
    written out from the published architecture (q and o are heads x d wide, k and v kv x d; a SwiGLU MLP is
    three h x f matrices)."""
    per_layer = hidden * heads * d + 2 * hidden * kv * d + heads * d * hidden + 3 * hidden * ffn
    linear = 6 * (layers * per_layer + vocab * hidden) * tokens
    attention = 12 * 0.5 * tokens**2 * heads * d * layers
    return linear + attention


@pytest.mark.parametrize("tokens", [4096, 131072, 1048576])
def test_model_flops_are_the_standard_count(tokens):
    for m, args in ((LLAMA3_8B, (32, 4096, 32, 8, 128, 14336, 128256)),
                    (QWEN3_06B, (28, 1024, 16, 8, 128, 3072, 151936))):  # fmt: skip
        got = CostModel(Cluster(name="c"), m).model_flops([tokens])
        want = hand_count(*args, tokens)
        assert got == pytest.approx(want, rel=1e-12), (m.name, tokens, got, want)
    # the known totals: llama3-8b at 1M tokens 9.12e17 (issue 32), Qwen3-8B 1.02e18
    assert CostModel(Cluster(name="c"), LLAMA3_8B).model_flops([1048576]) == pytest.approx(9.12e17, rel=2e-3)


def test_mfu_of_the_published_run():
    """364 s per 1,048,576-token step on 8 H100s (989 TFLOP/s bf16) was published at 34.7% (its count rounded to
    1.0e18; this count is 1.020e18, 35.4% at 364 s and 34.6% at the 373 s the transformers PR gives)."""
    cost = CostModel(Cluster(name="h100", peak_tflops=989.0), QWEN3_8B)
    assert cost.model_flops([1048576]) == pytest.approx(1.0204e18, rel=1e-3)
    assert cost.mfu([1048576], 364.0, 8) == pytest.approx(0.347, abs=0.008)
    assert cost.mfu([1048576], 373.0, 8) == pytest.approx(0.347, abs=0.002)


def test_attention_runs_at_the_kernels_stated_speeds():
    """Full checkpointing: the forward at its speed twice (the recompute), the backward (twice the forward's
    FLOPs) at its speed; the GEMMs at peak x mfu."""
    cl = Cluster(name="c", peak_tflops=1000.0, mfu=0.5, attention_tflops={"k": {"fwd": 500.0, "bwd": 400.0}},
                 attention_kernel="k")  # fmt: skip
    cost = CostModel(cl, LLAMA3_8B)
    n, p = 65536, 4
    fwd = 4 * 0.5 * n * n * 32 * 128 * 32  # the forward's FLOPs, all layers
    attention = (2 * fwd / 500e12 + 2 * fwd / 400e12) / p
    linear = 6 * (LLAMA3_8B.linear_params + 128256 * 4096) * n * 4 / 3 / 500e12 / p  # recomputed: x 4/3
    assert float(cost.attention_s(n, p)) == pytest.approx(attention, rel=1e-12)
    assert float(cost.compute_s(n, p)) == pytest.approx(attention + linear, rel=1e-12)
    with pytest.raises(ValueError, match="attention_kernel='x'; valid: one of cluster.attention_tflops"):
        Cluster(name="c", attention_tflops={"k": {"fwd": 1.0, "bwd": 1.0}}, attention_kernel="x")
    with pytest.raises(ValueError, match=r"attention_tflops.k=\{'fwd': 1.0\}; valid"):
        Cluster(name="c", attention_tflops={"k": {"fwd": 1.0}})


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "cli.plan", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip


def test_default_planner_holds_a_million_tokens_on_one_node_and_names_its_constants():
    res = _plan("cluster=h100x64", "cluster.nodes=1", "model=llama3-8b", "lengths.fixed=[1048576]",
                "output.format=json", "output.baselines=false")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads(res.stdout)["summary"]
    assert "offload" in s["memory_gib_mode"] and s["peak_memory_gib"] <= 76.0
    assert s["attention_kernel"].startswith("cudnn (forward 539") and "not a measurement" in s["constants_source"]


def test_nothing_fits_names_what_each_technique_set_holds():
    res = _plan("cluster=h100x64", "cluster.nodes=1", "model=llama3-8b", "lengths.fixed=[16777216]",
                "planner.checkpointing=[]", "planner.loss_chunk_tokens=[]", "planner.tile_tokens=[]")  # fmt: skip
    assert res.returncode == 2
    err = res.stderr
    assert "exceeds what the cluster can hold" in err and "with the model's own settings (full)" in err
    assert "with offload [planner.checkpointing=[offload]]" in err and "tile 8192" in err
    assert "nodes (" in err and "GPUs) hold it with every technique" in err


def test_measured_kernel_speeds_replace_the_profiles(tmp_path):
    """A kernel calibration file (what ``sp-bench gpu`` writes): plans assume its fastest kernel at its
    measured speeds and say where they were measured."""
    from planner.calibration import kernel_file

    doc = kernel_file({"cudnn": {"fwd": 400.0, "bwd": 300.0}, "torch_flash": {"fwd": 300.0, "bwd": 250.0}},
                      {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0"})  # fmt: skip
    assert doc["attention_kernel"] == "cudnn"
    (tmp_path / "kernels.json").write_text(json.dumps(doc))
    res = _plan(
        "cluster=h100x64",
        "cluster.nodes=1",
        "model=llama3-8b",
        "lengths.fixed=[131072]",
        f"cluster.calibration={tmp_path / 'kernels.json'}",
        "output.format=json",
        "output.baselines=false",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads(res.stdout)["summary"]
    assert s["attention_kernel"].startswith("cudnn (forward 400, backward 300")
    assert "measured by sp-bench gpu on NVIDIA H100 80GB HBM3" in s["constants_source"]
    bad = {**doc, "attention_tflops": {"cudnn": {"fwd": -1.0, "bwd": 1.0}}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = _plan(
        "cluster=h100x64", "model=llama3-8b", "lengths.fixed=[4096]", f"cluster.calibration={tmp_path}/bad.json"
    )
    assert res.returncode == 2 and "attention_tflops.cudnn=" in res.stderr


def test_qwen3_moe_at_a_million_tokens_fits_one_node_with_states_on_the_host():
    """Qwen3-30B-A3B's fp32 states are 57 GiB per GPU on 8 H100s: the default planner.state_offload=auto puts
    them in host memory for a 1M-token sequence (and only then), and the JSON breaks the plan down per term."""
    args = ("cluster=h100x64", "cluster.nodes=1", "model=qwen3-30b-a3b", "output.format=json", "output.baselines=false")
    res = _plan(*args, "lengths.fixed=[1048576]")
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads(res.stdout)["summary"]
    assert s["states_gib"]["where"] == "host" and s["states_gib"]["total"] > 50 and s["memory_gib"]["states"] == 0
    assert s["peak_memory_gib"] <= 76.0 and s["memory_gib"]["host_states_per_gpu"] == s["states_gib"]["total"]
    assert s["flops_per_step"] and s["parameters"]["experts"] > 0 and s["states_gib"]["host_optimizer_s"] > 0
    short = json.loads(_plan(*args, "lengths.fixed=[16384]").stdout)["summary"]
    assert short["states_gib"]["where"] == "gpu" and short["memory_gib"]["states"] > 50  # fits: not offloaded


def test_start_up_check_admits_what_the_planner_places():
    """sp-train's start-up check (planner.capacity.world_capacity), the state-offload choice and the planner count
    capacities the same way, per layout: a length the planner places on one node is not refused at start-up."""
    from dataclasses import replace

    from benchmarks.capacity import _cluster, config_fields
    from planner.capacity import world_capacity
    from planner.cost import CostModel
    from planner.planner import Planner, PlannerConfig, memory_modes
    from planner.state_offload import resolve
    from planner.types import ModelShape

    config = PlannerConfig(use_milp=False, checkpointing=("offload",), loss_chunk_tokens=(2048,),
                           tile_tokens=(8192,))  # fmt: skip
    for name, length, states_on_host in (("llama3-8b", 5_242_880, False), ("qwen3-30b-a3b", 1_048_576, True)):
        model = ModelShape(**config_fields("model", name))
        modes = memory_modes(model, config)
        cost = resolve(CostModel(_cluster(8), model), "auto", length, modes)
        assert cost.state_offload == states_on_host and world_capacity(cost, modes) >= length, name
        assert Planner(cost, config).plan([length]).micro_steps  # placed
        if states_on_host:
            assert world_capacity(replace(cost, state_offload=False), modes) < length, "why the states moved"
