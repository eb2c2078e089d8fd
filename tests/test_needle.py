"""Needle retrieval: the tasks (deterministic, where the needles are, the variants, the task file), and the
score under the planner's plans on 4 ranks (plain and chunked loss) against an independent single-process
scorer (argmax and log-softmax of the plain model's logits); the in-loop report and sp-eval on a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.data.corpus import encoder
from trainer.tasks.needle import NeedleConfig, NeedleGrid, NeedleTask, build_tasks, read_tasks, write_tasks

BYTES = encoder(None)
FILLER = [BYTES((Path(__file__).parents[1] / "planner" / "cost.py").read_text())]  # no needle phrase in it


def _text(ids: np.ndarray) -> str:
    return bytes(ids.astype(np.uint8)).decode("utf-8")


def test_tasks_are_deterministic_and_put_the_needle_at_its_depth():
    cfg = NeedleConfig(lengths=(512, 1024), depths=(0.0, 0.5, 1.0), samples=2, seed=3)
    tasks = build_tasks(cfg, cfg.lengths, FILLER, BYTES)
    again = build_tasks(cfg, cfg.lengths, FILLER, BYTES)
    assert len(tasks) == 2 * 3 * 2
    assert all(np.array_equal(a.input_ids, b.input_ids) and a.targets == b.targets for a, b in zip(tasks, again))
    other = build_tasks(NeedleConfig(lengths=(512,), depths=(0.5,), seed=4), (512,), FILLER, BYTES)
    assert not np.array_equal(other[0].input_ids, tasks[2].input_ids)
    for t in tasks:
        text = _text(t.input_ids)
        assert len(t.input_ids) == t.length
        key = text.split("What is the special magic number for ")[1].split("?")[0]
        value = _text(t.input_ids[list(t.targets)]).strip()
        assert len(value) == 6 and value.isdigit() and text.endswith(f"for {key} is: {value}")
        needle = f" The special magic number for {key} is: {value}. "
        hay = len(text) - len(needle) - (len(text) - text.index(" What is the special"))
        assert text.count(needle) == 1 and abs(text.index(needle) - t.depth * hay) <= 1, "the needle at its depth"
        assert t.targets == tuple(range(t.length - len(value) - 1, t.length))


def test_multikey_and_multivalue_variants():
    multi = build_tasks(NeedleConfig(lengths=(1024,), depths=(0.25,), needles=4), (1024,), FILLER, BYTES)[0]
    text = _text(multi.input_ids)
    assert text.count("The special magic number for ") == 5, "the queried needle, three distractors, the answer"
    mv = build_tasks(NeedleConfig(lengths=(1024,), depths=(0.1,), values=3, digits=4), (1024,), FILLER, BYTES)[0]
    text = _text(mv.input_ids)
    key = text.split("What is the special magic number for ")[1].split("?")[0]
    answer = _text(mv.input_ids[list(mv.targets)]).strip().split(", ")
    found = [text[i:].split(" is: ")[1].split(".")[0] for i in _finds(text, f"The special magic number for {key} is")]
    assert len(answer) == 3 and found == answer, "every value of the key, in order of appearance"


def _finds(text: str, sub: str) -> list[int]:
    out, i = [], text.find(sub)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out[:-1]  # the last is the query's answer line


def test_task_file_roundtrip_and_bad_files(tmp_path):
    tasks = build_tasks(NeedleConfig(lengths=(300,), depths=(0.0, 1.0)), (300,), FILLER, BYTES)
    write_tasks(tasks, tmp_path / "t.jsonl")
    back = read_tasks(tmp_path / "t.jsonl")
    assert [(t.length, t.depth, t.targets) for t in back] == [(t.length, t.depth, t.targets) for t in tasks]
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(back, tasks))
    row = json.loads(tasks[0].to_json())
    for bad, match in [({**row, "targets": [0]}, "must lie in 1.."), ({"length": 3}, "not a needle task")]:
        (tmp_path / "b.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=match):
            read_tasks(tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        read_tasks(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="cannot hold its needles"):
        build_tasks(NeedleConfig(lengths=(64,), depths=(0.5,)), (64,), FILLER, BYTES)
    with pytest.raises(ValueError, match="valid: a non-empty list of fractions"):
        NeedleConfig(depths=(1.5,))


def test_grid_means_by_cell():
    t = lambda n, d: NeedleTask(n, d, np.zeros(n, np.int64), (n - 1,))  # noqa: E731
    tasks = [t(100, 0.0), t(100, 0.0), t(100, 1.0), t(200, 0.0)]
    sums = np.array([[1, 1, -0.5], [0, 1, -2.5], [1, 1, -1.0], [0, 1, -3.0]], dtype=float)
    g = NeedleGrid.of_sums(tasks, sums)
    assert g.lengths == (100, 200) and g.depths == (0.0, 1.0)
    assert g.accuracy[0] == (0.5, 1.0) and g.logprob[0] == (-1.5, -1.0) and g.accuracy[1][0] == 0.0
    assert np.isnan(g.accuracy[1][1]) and g.samples == 2


LENGTHS = (200, 700)


def _tasks() -> list[NeedleTask]:
    """Grid tasks, plus two whose every position is a target (an untrained model gets some argmaxes right)."""
    base = build_tasks(NeedleConfig(lengths=LENGTHS, depths=(0.0, 0.5, 1.0), samples=1), LENGTHS, FILLER, BYTES)
    dense = [NeedleTask(n, 0.5, FILLER[0][i : i + n].copy(), tuple(range(1, n))) for i, n in ((0, 700), (50, 760))]
    return base + dense


def _job(tmp, chunk=0):
    from dataclasses import replace

    from tests.test_trainer import _job as base
    from trainer.config import EvalConfig

    job = base(tmp, "adaptive", 2, use_milp=False, checkpoint_every=2)
    needle = NeedleConfig(lengths=(256, 512), depths=(0.0, 1.0), samples=1)
    return replace(job, model=replace(job.model, loss_chunk_tokens=chunk),
                   eval=EvalConfig(every=2, holdout=0.05, max_docs=4, tasks=("needle",), needle=needle))  # fmt: skip


def _distributed(rank, world, tmp, tasks):
    from trainer.loop import Trainer

    out = {}
    for chunk in (0, 48):
        tr = Trainer(_job(f"{tmp}/chunk{chunk}", chunk))
        tr.evaluate_needle(tasks)  # before any step: the seed's initial weights
        out[chunk] = tr.last_needle_sums
    tr = Trainer(_job(f"{tmp}/run"))
    tr.run()  # 2 steps, evaluation (loss and needle) and a checkpoint at step 2
    out["loop"] = (Path(tmp) / "run" / "eval" / "needle_step_000002.json").read_text()
    tr.evaluate_needle(tasks)  # (its report replaces that file)
    out["trained"] = tr.last_needle_sums
    return out


def _reference(rank, world, tasks):
    """Independent scorer: the plain model (no SP, no planner, no hits hook) on one task at a time; hits from
    the argmax of its logits, log-probabilities from their log-softmax."""
    import torch
    from megatron.core import parallel_state

    import sp
    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt

    job = _job("/nonexistent")
    parallel_state.initialize_model_parallel(1, 1)
    model = build_gpt(job.model, 2048, seed=job.train.seed).eval()
    pool = sp.GroupPool()
    sums = np.zeros((len(tasks), 3))
    with torch.no_grad():
        for i, t in enumerate(tasks):
            ctx = pool.context((0,), 1, 1, [0, t.length - 1], check=False)
            x = torch.from_numpy(t.input_ids[:-1])[None]
            logits = model(x, None, None, packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx))
            logits = logits.reshape(t.length - 1, -1).double()  # [1, s, V] -reshape-> [s, V]
            rows = np.array(t.targets) - 1  # the row that predicts position p
            labels = torch.from_numpy(t.input_ids[rows + 1])
            lp = torch.log_softmax(logits[rows], dim=-1).gather(1, labels[:, None])[:, 0]
            sums[i] = [float((logits[rows].argmax(-1) == labels).sum()), len(rows), float(lp.sum())]
    return sums


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.dist import run_distributed

    tmp = tmp_path_factory.mktemp("needle")
    tasks = _tasks()
    ref = run_distributed(_reference, 1, tasks, timeout=300)[0]
    dist = run_distributed(_distributed, 4, str(tmp), tasks, timeout=900)[0]
    return tmp, tasks, ref, dist


@pytest.mark.parametrize("chunk", [0, 48])
def test_score_on_four_ranks_equals_a_single_process_scorer(runs, chunk):
    _, tasks, ref, dist = runs
    got = dist[chunk]
    np.testing.assert_array_equal(got[:, :2], ref[:, :2])  # targets right and counted, task by task
    np.testing.assert_allclose(got[:, 2], ref[:, 2], rtol=1e-5)
    assert ref[-2:, 0].sum() > 0, "some argmaxes right: the comparison of hits is not vacuous"


def test_loop_reports_the_needle_and_sp_eval_scores_the_checkpoint(runs):
    tmp, tasks, _, dist = runs
    run = Path(tmp) / "run"
    body = json.loads(dist["loop"])
    assert body["lengths"] == [256, 512] and body["depths"] == [0.0, 1.0] and body["step"] == 2
    assert (run / "eval" / "needle_step_000002.png").stat().st_size > 5000
    write_tasks(tasks, Path(tmp) / "tasks.jsonl")
    cmd = [sys.executable, "-m", "cli.evaluate", str(run), "--task", "needle", "--json"]
    out = subprocess.run([*cmd, "--tasks-in", str(Path(tmp) / "tasks.jsonl")], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert set(res) >= {"task", "lengths", "depths", "accuracy", "logprob", "samples"} and res["task"] == "needle"
    assert (run / "eval" / "offline-step_000002" / "eval" / "needle_step_000002.png").is_file(), "beside sp-eval's"
    want = NeedleGrid.of_sums(tasks, dist["trained"])  # the same checkpoint on 4 ranks, inside the trainer
    np.testing.assert_allclose(np.array(res["logprob"], dtype=float), np.array(want.logprob), rtol=1e-5)
    assert res["accuracy"] == want.json()["accuracy"] and None in res["accuracy"][-1], "empty cells are null"
    out = subprocess.run([*cmd, "--lengths", "300", "--depths", "0", "1", "--samples", "2", "--tasks-out",
                          str(Path(tmp) / "made.jsonl")], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    made = read_tasks(Path(tmp) / "made.jsonl")
    assert res["lengths"] == [300] and res["depths"] == [0.0, 1.0] and len(made) == 4 and res["samples"] == 2
