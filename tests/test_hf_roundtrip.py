"""Import -> train -> ``sp-export`` -> transformers, through the real trainer on 2 ranks (FSDP, fp32), for a
Llama, a Qwen3 (per-head q/k norms) and a Qwen3-MoE model:
bit-exact round trip of every tensor, the exported model's loss in transformers equal to our trainer's
after 3 steps, tokenizer files carried through, staged init from a run, and the command-line errors for bad
input (one line, exit 2, nothing written to the run folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

TEXTS = [("def f(x):\n    return x * 2\n" * (1 + i % 7)) + f"# file {i}\n" for i in range(40)]


def _tokenizer(folder: Path, vocab: int | None = None, words: int = 0) -> None:
    """The folder's tokenizer.json: a BPE of at most ``vocab`` tokens trained on TEXTS, or a word-level one
    of exactly ``words`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if words:
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
        tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"]))
    tok.save(str(folder / "tokenizer.json"))


def _job(out, hf, data, steps=3, init_from=None, rope_theta=None):
    from models.hf.config import shape_from_folder
    from planner.planner import PlannerConfig
    from planner.types import Cluster
    from trainer.config import DataConfig, TrainConfig
    from trainer.loop import TrainJob

    model = shape_from_folder(hf, rope_theta=rope_theta, checkpointing="full", bytes_per_value=4)
    return TrainJob(
        model=model,
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=2, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0),
        planner=PlannerConfig(use_milp=False),
        data=DataConfig(source="jsonl", path=data, tokenizer=hf, max_len=512, tokens_per_step=1500, seed=1),
        train=TrainConfig(steps=steps, out_dir=out, progress=False, warmup_steps=1, checkpoint_every=steps,
                          resume=False, picture_every=0, precision="fp32", lr=1e-3,
                          init_from=init_from or f"hf:{hf}"),
    )  # fmt: skip


def _fixed_loss(tr, docs):
    """Our trainer's model on ``docs``: mean token loss, forward only, all ranks in one u=2 group."""
    import torch.distributed as dist

    from planner.types import Assignment, GroupShape
    from trainer.step import group_pass

    g = Assignment(0, GroupShape(2, 1), tuple(range(len(docs))), 0.0, 0.0)
    with torch.no_grad():
        total = group_pass(tr.model, tr.pool, g, docs, "torch", tr.device).double()
    dist.all_reduce(total)
    return float(total) / sum(len(d) - 1 for d in docs)


def _worker(rank, world, hf, data, tmp):
    import numpy as np

    from trainer import checkpoint
    from trainer.loop import Trainer

    out = {}
    tr = Trainer(_job(f"{tmp}/imported", hf, data))  # load only: checkpoint step 0 as imported
    checkpoint.save(f"{tmp}/imported", 0, tr.model, tr.optim, {"loader": tr.loader.state()}, tr.config)
    tr = Trainer(_job(f"{tmp}/trained", hf, data))
    out["losses"] = tr.run()
    g = np.random.default_rng(5)
    docs = [g.integers(0, 200, n).astype(np.int64) for n in (40, 300, 9)]
    out["fixed"] = _fixed_loss(tr, docs)
    out["docs"] = docs
    # a second stage: weights only from the trained run, a raised rope base, a fresh optimiser and data
    from trainer.sharding import full_state

    trained = full_state(tr.model)
    st = Trainer(_job(f"{tmp}/stage2", hf, data, steps=1, init_from=f"{tmp}/trained", rope_theta=8e6))
    out["stage2_step"] = st.step
    out["stage2_same_weights"] = all(torch.equal(a, trained[k]) for k, a in full_state(st.model).items())
    out["stage2_fixed"] = _fixed_loss(st, docs)
    out["stage2_theta"] = st.job.model.theta
    return out


@pytest.fixture(scope="module", params=["llama3", "qwen3", "qwen3_moe"])
def run(tmp_path_factory, request):
    from tests.hf_models import make

    tmp = tmp_path_factory.mktemp("roundtrip")
    hf = tmp / "hf"
    make(hf, request.param, shard="40KB")
    _tokenizer(hf, 200)
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    parts = run_distributed(_worker, 2, str(hf), str(data), str(tmp), timeout=600)
    return tmp, hf, parts[0]


def _export(run_dir, out, *extra):
    return subprocess.run([sys.executable, "-m", "cli.export", str(run_dir), str(out), *extra], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_import_then_export_is_bit_exact(run):
    from safetensors.torch import load_file

    tmp, hf, _ = run
    res = _export(tmp / "imported", tmp / "exported0", "--dtype", "fp32", "--max-shard-gb", "0.0001")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["shards"] > 1 and "tokenizer.json" in summary["tokenizer_files"]
    want, got = {}, {}
    for f in hf.glob("*.safetensors"):
        want.update(load_file(f))
    for f in (tmp / "exported0").glob("model-*-of-*.safetensors"):
        got.update(load_file(f))
    index = json.loads((tmp / "exported0" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_trained_export_loads_in_transformers_with_the_same_loss(run):
    import transformers
    from tokenizers import Tokenizer

    tmp, hf, out = run
    assert len(out["losses"]) == 3 and out["losses"][-1] < out["losses"][0]
    res = _export(tmp / "trained", tmp / "exported", "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp / "exported", output_loading_info=True,
                                                                     attn_implementation="eager")  # fmt: skip
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = json.loads((tmp / "exported" / "config.json").read_text())
    source = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == source["architectures"] and cfg["head_dim"] == source["head_dim"]
    if source["architectures"] == ["LlamaForCausalLM"]:
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 500000.0
    total = n = 0.0
    with torch.no_grad():
        for d in out["docs"]:
            d = torch.from_numpy(d)
            logits = model(d[None, :-1]).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, d[1:], reduction="sum"))
            n += len(d) - 1
    assert abs(total / n - out["fixed"]) < 1e-5, (total / n, out["fixed"])
    text = TEXTS[3]
    assert (
        Tokenizer.from_file(str(tmp / "exported" / "tokenizer.json")).encode(text).ids
        == Tokenizer.from_file(str(hf / "tokenizer.json")).encode(text).ids
    )
    bf16 = _export(tmp / "trained", tmp / "exported_bf16")
    assert bf16.returncode == 0 and json.loads(bf16.stdout)["dtype"] == "bf16"


def test_stage_two_starts_from_the_runs_weights_only(run):
    _, _, out = run
    assert out["stage2_step"] == 0  # a new run: step 0, fresh optimiser and data position
    assert out["stage2_theta"] == 8e6 and out["stage2_same_weights"]
    assert out["stage2_fixed"] != pytest.approx(out["fixed"], abs=1e-6)  # same weights, another rope base


def _train(tmp, *overrides):
    cmd = [sys.executable, "-m", "cli.train", "train.steps=1", "train.progress=false", f"train.out_dir={tmp}/run",
           "data.max_len=256", "data.tokens_per_step=512", *overrides]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                          env={**__import__("os").environ, "MASTER_PORT": "29631"})  # fmt: skip


@pytest.mark.slow  # one subprocess per bad input
def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    from tests.hf_models import make

    hf = tmp_path / "hf"
    make(hf, "llama3", shard="40KB")
    shards = sorted(hf.glob("model-*.safetensors"))
    cases = {}
    # a missing shard
    missing = tmp_path / "missing"
    missing.mkdir()
    for f in hf.iterdir():
        if f != shards[1]:
            (missing / f.name).write_bytes(f.read_bytes())
    cases["missing"] = ([f"model.hf_path={missing}", f"train.init_from=hf:{missing}"], shards[1].name)
    # a tensor with the wrong shape
    from safetensors.torch import load_file, save_file

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in hf.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    shard = wrong / index["model.layers.0.mlp.up_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(tensors, shard)
    cases["shape"] = ([f"model.hf_path={wrong}", f"train.init_from=hf:{wrong}"], "model.layers.0.mlp.up_proj.weight")
    # an unsupported architecture (linear-attention layers; Mixtral is supported since Qwen3/MoE support)
    moe = tmp_path / "moe"
    moe.mkdir()
    cfg = json.loads((hf / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3NextForCausalLM"]}))
    cases["arch"] = ([f"model.hf_path={moe}"], "architectures")
    # a tokenizer bigger than the model's vocabulary
    big = tmp_path / "big"
    big.mkdir()
    _tokenizer(big, words=300)
    cases["tokenizer"] = ([f"model.hf_path={hf}", f"data.tokenizer={big}"], "more than model.vocab=256")
    for name, (overrides, needle) in cases.items():
        res = _train(tmp_path / name, "model=hf", *overrides)
        lines = [x for x in res.stderr.splitlines() if x.startswith("sp-train: error")]
        assert res.returncode == 2, (name, res.stderr[-2000:])
        assert len(lines) == 1 and needle in lines[0], (name, lines, res.stderr[-1500:])
        assert "Traceback" not in res.stderr, name
        assert not (tmp_path / name / "run").exists(), name  # nothing written to the run folder
