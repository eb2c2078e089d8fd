"""Issue 19 (validation): held-out documents evaluated forward-only under the adaptive planner on 4 ranks equal
an independent single-process evaluation (one document at a time, buckets counted by hand) within 1e-5."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.dist import run_distributed

EDGES = [1024, 4096, 16384, 65536]  # 0-1K, 1-4K, 4-16K, 16-64K, 64K+ (written out again: independent)


def _corpus(path):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(40):
        text = "".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(100, 2900))))
        if i % 5 == 0:  # some masked rows: evaluated on their trained targets only
            rows.append({"prompt": text[:80], "completion": text[80:]})
        else:
            rows.append({"text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _job(tmp, path):
    from dataclasses import replace

    from tests.test_trainer import _job as base
    from trainer.config import EvalConfig

    job = base(f"{tmp}/eval", "adaptive", use_milp=False)
    return replace(job, data=replace(job.data, source="jsonl", path=path, max_len=2500, tokens_per_step=6000),
                   eval=EvalConfig(every=1, holdout=0.25, max_docs=8, tokens_per_step=4000))  # fmt: skip


def _worker(rank, world, tmp, path):
    import torch

    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt
    from trainer.data.corpus import doc_pieces, target_weights
    from trainer.loop import Trainer

    tr = Trainer(_job(tmp, path))
    shard = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 - FSDP's DTensors
    local = lambda: [shard(p.detach()).clone() for p in tr.model.parameters()]  # noqa: E731
    params_before = local()
    got = tr.evaluate()
    unchanged = all(torch.equal(a, b) for a, b in zip(params_before, local(), strict=True))
    trained = set(tr.loader.streams[0].eligible.tolist())
    if rank:
        return None
    keep = set(tr.heldout[0][: tr.job.eval.max_docs].tolist())
    docs = doc_pieces(tr.loader.corpora[0], sorted(keep), 2500, "split")
    ref = build_gpt(tr.job.model, tr.job.data.max_len, seed=tr.job.train.seed)
    pos_sum, pos_n, len_sum, len_n = ([0.0] * 5 for _ in range(4))
    bucket = lambda x: sum(x >= e for e in EDGES)  # noqa: E731
    with torch.no_grad():
        for d in docs:
            ctx = tr.pool.context((0,), 1, 1, [0, len(d) - 1], check=False)
            losses = ref(torch.from_numpy(np.asarray(d[:-1]))[None], None, None,
                         labels=torch.from_numpy(np.asarray(d[1:]))[None],
                         packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx))[0].tolist()  # fmt: skip
            for p, (loss, w) in enumerate(zip(losses, target_weights(d).tolist(), strict=True)):
                if w:
                    pos_sum[bucket(p)] += loss
                    pos_n[bucket(p)] += 1
                    len_sum[bucket(len(d) - 1)] += loss
                    len_n[bucket(len(d) - 1)] += 1
    return {"got": got, "pos": (pos_sum, pos_n), "len": (len_sum, len_n), "unchanged": unchanged,
            "leak": sorted(keep & trained), "n_docs": len(docs)}  # fmt: skip


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    _corpus(tmp / "c.jsonl")
    return run_distributed(_worker, 4, str(tmp), str(tmp / "c.jsonl"), timeout=300)[0]


def _no_nan(name: str) -> float:
    raise AssertionError(f"sp-eval printed {name}, which strict JSON parsers refuse")


def test_validation_equals_a_single_process_evaluation_by_position_and_length(result):
    got = result["got"]
    names = ["0-1K", "1-4K", "4-16K", "16-64K", "64K+"]
    for kind, table in (("pos", got.by_position), ("len", got.by_length)):
        sums, counts = result[kind]
        for i, name in enumerate(names):
            mean, n = table[name]
            assert n == counts[i], (kind, name)
            if counts[i]:
                assert mean == pytest.approx(sums[i] / counts[i], abs=1e-5), (kind, name)
            else:
                assert math.isnan(mean)
    assert sum(result["pos"][1][:2]) == got.tokens and all(result["pos"][1][:2])  # two position buckets hit
    assert got.loss == pytest.approx(sum(result["pos"][0]) / got.tokens, abs=1e-5)


def test_validation_trains_nothing_and_never_sees_training_documents(result):
    assert (result["unchanged"], result["leak"], result["n_docs"] >= 8) == (True, [], True), result["n_docs"]


@pytest.mark.slow  # test_needle scores a checkpoint with sp-eval in the fast suite
def test_sp_eval_on_a_checkpoint_equals_the_evaluation_during_training(tmp_path):
    """Train 2 steps with evaluation (torchrun, 2 ranks); sp-eval on the last checkpoint (torchrun, 2 ranks)
    reports the loss the trainer logged at that step."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "SP_SIGNAL"))}
    env["OMP_NUM_THREADS"] = "1"
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    rng = np.random.default_rng(0)
    data = tmp_path / "docs.jsonl"
    letters = np.frombuffer(b"abcdefghij klmnop", dtype=np.uint8)
    data.write_text("".join(json.dumps({"text": rng.choice(letters, int(n)).tobytes().decode()}) + "\n"
                            for n in rng.integers(100, 1500, 300)))  # fmt: skip
    train = subprocess.run([*launch, "cli.train", f"train.out_dir={run}", "train.steps=2", "train.progress=false",
                            "data.source=jsonl", f"data.path={data}", "data.tokens_per_step=4096", "eval.every=2",
                            "eval.holdout=0.02", "eval.max_docs=4"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    logged = re.search(r"eval at step 2: loss (\S+) over (\d+) tokens", train.stdout)
    assert logged, train.stdout[-2000:]
    assert (run / "eval" / "loss_by_position_step_000002.png").exists()
    ev = subprocess.run([*launch, "cli.evaluate", str(run)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=240)  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    body = json.loads(ev.stdout.strip().splitlines()[-1], parse_constant=_no_nan)  # strict JSON: empty buckets null
    assert body["step"] == 2 and body["tokens"] == int(logged.group(2))
    assert body["loss"] == pytest.approx(float(logged.group(1)), abs=1e-4)  # the log prints 4 decimals
    assert json.loads((run / "eval" / "offline_step_000002.json").read_text())["loss"] == body["loss"]
    data.write_bytes(data.read_bytes().replace(b"a", b"b"))  # sed -i 's/a/b/g': same lengths, other documents
    single = [sys.executable, "-m", "cli.evaluate", str(run)]
    changed = subprocess.run(single, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert changed.returncode == 2 and "training data changed" in changed.stderr, changed.stderr[-3000:]
    assert "content_xxh3_128" in changed.stderr and "Traceback" not in changed.stderr
    anyway = subprocess.run([*single, "--data-changed-ok"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)  # fmt: skip
    assert anyway.returncode == 0, anyway.stderr[-3000:]
    flagged = json.loads(anyway.stdout.strip().splitlines()[-1])
    assert "content_xxh3_128" in flagged["data_changed"][0] and "WARNING" in anyway.stderr
    bare = tmp_path / "bare"  # a run with nothing held out: its config says eval.holdout=0
    ck = bare / "checkpoints" / "step_000001"
    ck.mkdir(parents=True)
    stored = json.loads((run / "checkpoints" / "step_000002" / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**stored, "eval.holdout": 0.0, "eval.every": 0}))
    from trainer.checkpoint import write_manifest

    write_manifest(ck)
    refused = subprocess.run([sys.executable, "-m", "cli.evaluate", str(bare)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "trained without held-out documents" in refused.stderr
