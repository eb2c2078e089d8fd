"""Hugging Face import against transformers itself (the independent reference), on tiny random models the
tests create: per-token losses of packed documents under every SP strategy on 1, 2 and 4 ranks and under
the adaptive planner, for plain theta, linear, llama3 and yarn RoPE, Qwen2 (biases, tied embeddings) and
Qwen3 (per-head q/k RMSNorm, head_dim independent of the hidden size);
gradients per strategy; the FSDP-sharded load bit-exact; config parsing in both layouts; bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.dist import prepared_pool, run_distributed

KINDS = ["theta", "linear", "llama3", "yarn", "qwen2", "qwen3"]
GRAD_KINDS = ["llama3", "qwen3"]
LENGTHS = (2, 8, 301, 1001)  # tokens per document: 1, 7, 300 and 1000 training positions
SHAPES = [(1, 1), (2, 1), (1, 2), (4, 1), (1, 4), (2, 2)]  # (u, r) on 1, 2 and 4 ranks
TOL = 1e-5


def _docs():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g) for n in LENGTHS]


def _extra(kind):
    return {"max_position_embeddings": 512} if kind == "yarn" else {}


def _shape(folder):
    from models.hf.config import shape_from_folder

    return shape_from_folder(folder)


def _plain_model(folder):
    """Our model, whole on this rank, loaded from the folder (the numerics path, without FSDP)."""
    from models.gpt import build_meta
    from models.hf.load import load_into
    from models.shards import materialize

    shape = _shape(folder)
    model = materialize(build_meta(shape, 4096), torch.device("cpu"))
    load_into(model, folder, shape)
    return model, shape


def _group_losses(model, pool, ranks, u, r, docs, rank):
    """Per-token losses of ``docs`` packed on the group ``ranks`` (u x r): {(doc, position): loss tensor}."""
    import sp
    from models.attention import SPPackedSeqParams

    cu = [0]
    for d in docs:
        cu.append(cu[-1] + len(d) - 1)
    ctx = pool.context(ranks, u, r, cu, check=False)
    inputs = torch.cat([d[:-1] for d in docs])
    labels = torch.cat([d[1:] for d in docs])
    tok, lab = sp.shard(inputs, ctx.layout, ctx.rank), sp.shard(labels, ctx.layout, ctx.rank)
    params = SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx)
    out = model(tok[None], None, None, labels=lab[None], packed_seq_params=params)[0]  # [local tokens]
    where = ctx.layout.token_index(ctx.rank)  # packed index of each local row, -1 for padding
    bounds = torch.tensor(cu)
    keep = where >= 0
    doc = torch.searchsorted(bounds, where[keep], right=True) - 1
    pos = where[keep] - bounds[doc]
    return out, keep, doc, pos


def _worker(rank, world, folders, plans):
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    pool = prepared_pool(world, tuple((tuple(g[0]), g[1]) for g in plans))
    docs = _docs()
    results = {}
    for kind in KINDS:
        model, _ = _plain_model(folders[kind])
        cases = [(f"u{u}r{r}", [((0,) if u * r == 1 else tuple(range(u * r)), u, r, list(range(len(docs))))])
                 for u, r in SHAPES]  # fmt: skip
        cases.append(("adaptive", plans))
        for name, groups in cases:
            mine = {}
            for ranks, u, r, seqs in groups:
                if rank in ranks:
                    sel = [docs[s] for s in seqs]
                    with torch.no_grad():
                        out, keep, doc, pos = _group_losses(model, pool, ranks, u, r, sel, rank)
                    for loss, d, p in zip(out[keep].tolist(), doc.tolist(), pos.tolist()):
                        mine[(seqs[d], p)] = loss
            got = [None] * world
            dist.all_gather_object(got, mine)
            results[(kind, name)] = {k: v for part in got for k, v in part.items()}
        if rank == 0:  # logits of each document alone (the model without labels returns them)
            from models.attention import SPPackedSeqParams

            with torch.no_grad():
                results[(kind, "logits")] = [
                    model(d[None, :-1], None, None, packed_seq_params=SPPackedSeqParams(
                        qkv_format="sbhd", sp_ctx=pool.context((0,), 1, 1, [0, len(d) - 1], check=False)))[0]
                    for d in docs
                ]  # fmt: skip
    grads = {}
    for kind in GRAD_KINDS:
        grads[kind] = _grads(rank, pool, docs, folders[kind], plans)
    return (results, grads) if rank == 0 else None


def _grads(rank, pool, docs, folder, plans):
    import torch.distributed as dist

    grads = {}
    model, _ = _plain_model(folder)
    for name, groups in [("u4r1", [((0, 1, 2, 3), 4, 1, [0, 1, 2, 3])]), ("u1r4", [((0, 1, 2, 3), 1, 4, [0, 1, 2, 3])]),
                         ("u2r2", [((0, 1, 2, 3), 2, 2, [0, 1, 2, 3])]), ("adaptive", plans)]:  # fmt: skip
        model.zero_grad()
        for ranks, u, r, seqs in groups:
            if rank in ranks:
                out, keep, _, _ = _group_losses(model, pool, ranks, u, r, [docs[s] for s in seqs], rank)
                out[keep].sum().backward()
        g = {}
        for n, p in model.named_parameters():
            t = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(t)  # each rank holds its tokens' part of the gradient
            g[n] = t.clone()
        grads[name] = g
    return grads


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.hf_models import make_folders

    return make_folders(tmp_path_factory.mktemp("hf"), KINDS, sharded="llama3", extra={k: _extra(k) for k in KINDS})


@pytest.fixture(scope="module")
def distributed(folders):
    from planner.cost import CostModel
    from planner.planner import Planner, PlannerConfig
    from planner.types import Cluster

    cluster = Cluster(name="cpu", nodes=1, gpus_per_node=4, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                      intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0)  # fmt: skip
    plan = Planner(CostModel(cluster, _shape(folders["llama3"])), PlannerConfig()).plan([n - 1 for n in LENGTHS])
    assert len(plan.micro_steps) == 1, plan  # one micro-step: every document is forwarded once below
    groups = [(g.ranks, g.shape.ulysses, g.shape.ring, list(g.seqs)) for g in plan.micro_steps[0].groups if g.seqs]
    assert sorted(s for g in groups for s in g[3]) == [0, 1, 2, 3]
    return run_distributed(_worker, 4, {k: str(v) for k, v in folders.items()}, groups, timeout=600)[0]


def _reference(folder):
    import transformers

    from tests.hf_models import reference_losses

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return model, reference_losses(model, _docs())


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers(kind, folders, distributed):
    results, _ = distributed
    model, _ = _reference(folders[kind])
    with torch.no_grad():
        for d, got in zip(_docs(), results[(kind, "logits")]):
            want = model(d[None, :-1]).logits[0]
            assert float((got - want).abs().max()) < TOL, (kind, len(d))


@pytest.mark.parametrize("kind", KINDS)
def test_losses_equal_transformers_under_every_strategy(kind, folders, distributed):
    results, _ = distributed
    _, ref = _reference(folders[kind])
    for name in [f"u{u}r{r}" for u, r in SHAPES] + ["adaptive"]:
        got = results[(kind, name)]
        assert len(got) == sum(n - 1 for n in LENGTHS), (kind, name)
        err = max(abs(got[(d, p)] - float(ref[d][p].detach())) for d, p in got)
        assert err < TOL, (kind, name, err)


@pytest.mark.parametrize("kind", GRAD_KINDS)
def test_gradients_equal_transformers_per_strategy(kind, folders, distributed):
    from models.hf.export import split

    _, all_grads = distributed
    grads = all_grads[kind]
    model, ref = _reference(folders[kind])
    sum(r.sum() for r in ref).backward()
    want = dict(model.named_parameters())
    shape = _shape(folders[kind])
    worst = 0.0
    for name, g in grads.items():
        for ours, t in g.items():
            for hf, part in split(ours, t, shape).items():
                ref_grad = want[hf].grad
                err = float((part - ref_grad).abs().max() / ref_grad.abs().max())  # relative to the largest entry
                worst = max(worst, err)
                assert err < TOL, (name, ours, hf, err)
    print(f"gradients: worst max-abs error relative to the largest entry {worst:.2e}")


def _load_worker(rank, world, folder):
    """The FSDP path: meta build, shard over 4 ranks, each rank reads only its rows; unsharded it must
    equal transformers' tensors bit for bit (fp32)."""
    from megatron.core import parallel_state

    from models.gpt import build_meta
    from models.hf.load import load_into
    from models.shards import materialize
    from trainer.sharding import Regime, full_state, parallelize

    parallel_state.initialize_model_parallel(1, 1)
    shape = _shape(folder)
    model = materialize(parallelize(build_meta(shape, 4096), Regime("fsdp", "fp32", "full"), torch.device("cpu")),
                        torch.device("cpu"))  # fmt: skip
    read = load_into(model, folder, shape)
    return full_state(model), read


@pytest.mark.parametrize(
    "kind", ["llama3", pytest.param("qwen2", marks=pytest.mark.slow), pytest.param("qwen3", marks=pytest.mark.slow)]
)  # one architecture in the fast suite
def test_fsdp_sharded_load_is_bit_exact_and_rank_local(kind, folders):
    from safetensors.torch import load_file

    from models.hf.export import split

    parts = run_distributed(_load_worker, 4, str(folders[kind]), timeout=300)
    state, _ = parts[0]
    shape = _shape(folders[kind])
    want = {}
    for f in Path(folders[kind]).glob("*.safetensors"):
        want.update(load_file(f))
    seen = set()
    for ours, t in state.items():
        for hf, part in split(ours, t, shape).items():
            assert torch.equal(part, want[hf]), (ours, hf)
            seen.add(hf)
    assert seen == set(want) - ({"lm_head.weight"} if shape.tie_embeddings else set())
    total = sum(t.numel() * 4 for t in state.values())
    assert all(read < total / 2 for _, read in parts)  # each rank read about a quarter, never the whole model


def test_config_layouts_and_unsupported_configs(tmp_path):
    from models.hf.config import read_config, shape_fields

    v4 = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
          "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 176, "vocab_size": 256,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}  # fmt: skip
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    got = []
    for i, cfg in enumerate((v4, v5)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps(cfg))
        got.append(shape_fields(tmp_path / str(i)))
    assert got[0] == got[1] and got[0]["rope_theta"] == 500000.0 and got[0]["rope_scaling"]["rope_type"] == "llama3"
    bad = {
        "architectures": (["MixtralForCausalLM"], "architectures"),
        "use_sliding_window": (True, "use_sliding_window"),
        "rope_scaling": ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic'"),
        "mlp_bias": (True, "mlp_bias"),
    }
    for key, (value, needle) in bad.items():
        (tmp_path / key).mkdir()
        (tmp_path / key / "config.json").write_text(json.dumps({**v4, key: value}))
        with pytest.raises(ValueError, match=needle) as e:
            shape_fields(tmp_path / key)
        assert "config.json" in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        read_config(tmp_path / "nowhere")


@pytest.mark.slow  # the rank-local read is also checked by the bit-exact sharded load in the fast suite
def test_sharded_load_peak_memory_per_rank(tmp_path):
    """Each of 4 ranks grows by at most (model bytes / world) + the largest tensor + 64 MiB while loading
    (measured by ``sp-bench hf-load``'s code on a generated ~0.3 GB model)."""
    from benchmarks.hf_load import run

    rows = run(0.3, 4, str(tmp_path))
    ranks = [r for r in rows if "rank" in r]
    assert len(ranks) == 4
    for r in ranks:
        assert r["bytes_read"] < r["model_gib"] * 2**30 / 4 * 1.05  # its own rows, not the model
        assert r["load_growth_gib"] < r["bound_gib"] + 64 / 1024, r


def test_sp_plan_reads_a_folder_without_weights(tmp_path):
    """The planner sees the Hugging Face shape from config.json alone (a dry run for a model not yet here)."""
    import subprocess
    import sys

    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = subprocess.run([sys.executable, "-m", "cli.plan", "model=hf", f"model.hf_path={tmp_path}", "cluster=h100x64",
                          "lengths.fixed=[131072]", "output.format=json", "output.baselines=false"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["model"] == "hf" and out["summary"]["planned_step_s"] > 0
    shape = _shape(tmp_path)
    assert 8.0e9 < shape.params < 8.1e9 and shape.theta == 5e5  # Llama-3-8B: 8.03B parameters


def test_weights_must_match_the_architecture_exactly(tmp_path):
    """Missing, unexpected (an o_proj bias Llama has no place for), wrong-shape and non-floating tensors are
    refused, each named; unexpected ones load with train.allow_unexpected_weights; RoPE buffers some
    checkpoints carry are not weights and pass."""
    import torch
    from safetensors.torch import load_file, save_file

    from models.hf.load import check
    from tests.hf_models import make

    make(tmp_path / "hf", "llama3")
    shape = _shape(tmp_path / "hf")
    base = load_file(tmp_path / "hf" / "model.safetensors")
    cases = {
        "extra": ({**base, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)},
                  "unexpected tensors the model would not use ['model.layers.0.self_attn.o_proj.bias']"),
        "missing": ({k: v for k, v in base.items() if k != "model.layers.1.mlp.up_proj.weight"},
                    "missing tensors ['model.layers.1.mlp.up_proj.weight']"),
        "shape": ({**base, "model.norm.weight": torch.ones(65)}, "'model.norm.weight' has shape [65], needs [64]"),
        "dtype": ({**base, "model.norm.weight": torch.ones(64, dtype=torch.int8)}, "'model.norm.weight' is I8"),
    }  # fmt: skip
    for name, (tensors, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
        save_file(tensors, folder / "model.safetensors")
        with pytest.raises(ValueError, match=re.escape(message)):
            check(folder, shape)
    check(tmp_path / "extra", shape, allow_unexpected=True)  # the setting: load without the extra tensor
    buffers = tmp_path / "buffers"
    buffers.mkdir()
    (buffers / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({**base, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, buffers / "model.safetensors")
    check(buffers, shape)


def test_damaged_weights_are_refused_naming_the_file(tmp_path):
    """A truncated or header-damaged safetensors file and a tensor holding NaN are ValueErrors that name the
    file (and the tensor): one `sp-train: error:` line, not a traceback or a loss blamed on the learning rate."""
    import torch
    from safetensors.torch import load_file, save_file

    from models.hf.load import check

    make_dir = tmp_path / "hf"
    from tests.hf_models import make

    make(make_dir, "llama3")
    shape = _shape(make_dir)
    raw = (make_dir / "model.safetensors").read_bytes()
    for name, damaged in {"truncated": raw[: len(raw) // 2], "header": b"\0" * 8 + raw[8:]}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((make_dir / "config.json").read_text())
        (folder / "model.safetensors").write_bytes(damaged)
        with pytest.raises(ValueError, match=re.escape(f"{folder / 'model.safetensors'}: damaged safetensors file")):
            check(folder, shape)
    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "config.json").write_text((make_dir / "config.json").read_text())
    tensors = load_file(make_dir / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = torch.nan
    save_file(tensors, nan / "model.safetensors")
    check(nan, shape)  # headers are fine; the rows load_into reads are checked
    from models.hf.load import Checkpoint

    with Checkpoint(nan) as ck:
        ck.rows("model.layers.1.mlp.down_proj.weight", 0, 3)  # the rows before the NaN load
        with pytest.raises(ValueError, match=r"nan/model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' "
                           r"holds NaN/inf in rows \[0, 8\)"):  # fmt: skip
            ck.rows("model.layers.1.mlp.down_proj.weight", 0, 8)
