"""Trainer bad inputs and faults: clear messages, no hangs."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest

from planner.types import ModelShape
from tests.dist import RankError, run_distributed
from tests.test_trainer import _job
from trainer.config import DataConfig, SourceConfig
from trainer.data.corpus import Corpus
from trainer.data.mixture import Mixture


def _one(source, path=None, **kw):
    return Corpus(SourceConfig(name="a", source=source, path=path, **kw))


def test_missing_data_path():
    with pytest.raises(ValueError, match=r"source 'a' \(source='jsonl', path='/no/such/file.jsonl'\): JSONL file not"):
        _one("jsonl", "/no/such/file.jsonl")
    with pytest.raises(ValueError, match="no indexed dataset"):
        _one("indexed", "/no/such/prefix")


def test_empty_data(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ValueError, match="holds no document"):
        _one("glob", str(tmp_path / "*.txt"))
    with pytest.raises(ValueError, match="valid: \\['stdlib', 'pydoc', 'glob', 'jsonl', 'indexed'\\]"):
        DataConfig(source="s3")


def test_long_documents_split_or_rejected(tmp_path):
    (tmp_path / "doc.jsonl").write_text('{"text": "' + "x" * 100 + '"}\n{"text": "short one"}\n')

    def epoch(**kw):  # one epoch's pieces (training lengths) and the stream's counters
        cfg = DataConfig(source="jsonl", path=str(tmp_path / "doc.jsonl"), tokens_per_step=2, **kw)
        mix = Mixture([Corpus(s) for s in cfg.mixture()], cfg)
        lengths = [len(d) - 1 for _ in range(8) for d in mix.next_step()]
        s = mix.streams[0]
        return lengths, s

    lengths, s = epoch(max_len=30)
    assert sorted(lengths[:5]) == [8, 9, 30, 30, 30] and s.split >= 1  # 99 targets in pieces of <= 30
    lengths, s = epoch(max_len=30, long_docs="reject")
    assert set(lengths) == {8} and s.rejected >= 1
    with pytest.raises(ValueError, match="every document is longer than max_len=5"):
        epoch(max_len=5, long_docs="reject")


def _bad_configs(rank, world, tmp):
    from dataclasses import replace

    from trainer.loop import Trainer

    errors = {}
    job = _job(f"{tmp}/heads", "ulysses")
    job = replace(job, model=replace(job.model, heads=6, kv_heads=6, head_dim=8, hidden=48))
    for name, j in [
        ("heads", job),
        ("too_long", replace(_job(f"{tmp}/long"), data=replace(_job(tmp).data, max_len=10**9))),
    ]:
        try:
            Trainer(j)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    # NaN loss: poison the embedding; every step is skipped, then the run stops with a clear message
    tr = Trainer(replace(_job(f"{tmp}/nan", steps=5), train=replace(_job(tmp).train, steps=5, max_bad_steps=2)))
    tr.model.embedding.word_embeddings.weight.data.fill_(float("nan"))
    try:
        tr.run()
        errors["nan"] = None
    except RuntimeError as e:
        errors["nan"] = str(e)
    # a planner that hangs (issue 13): the step uses the greedy plan after train.plan_timeout_s
    tr = Trainer(replace(_job(f"{tmp}/late"), train=replace(_job(f"{tmp}/late").train, steps=2, plan_timeout_s=0.5)))
    slow = tr.planner.plan
    tr.planner.plan = lambda lengths: (time.sleep(30), slow(lengths))[1]  # type: ignore[method-assign]
    t0 = time.monotonic()
    losses = tr.run()
    errors["late"] = (tr.late_plans, losses, time.monotonic() - t0)
    return errors


def test_bad_configs_nan_loss_and_late_plans(tmp_path):
    results = run_distributed(_bad_configs, 4, str(tmp_path), timeout=180)
    for errors in results:
        assert "valid Ulysses degrees: [1, 2]" in errors["heads"] and "q heads=6" in errors["heads"]
        assert "cannot be held by any plan" in errors["too_long"]
        assert "2 non-finite losses in a row" in errors["nan"]
    late, losses, seconds = results[0]["late"]
    assert late == 2 and len(losses) == 2 and all(x == x for x in losses) and seconds < 20


def _dying(rank, world, store, out_file):
    os.environ["OMP_NUM_THREADS"] = "1"
    from datetime import timedelta

    import torch.distributed as dist

    from trainer.loop import Trainer

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=10))  # fmt: skip
    tr = Trainer(_job(os.path.dirname(out_file) + "/run", steps=50))
    if rank == 1:
        orig = tr._observe

        def die(*a, **k):
            orig(*a, **k)
            if tr.step == 1:
                os._exit(3)

        tr._observe = die
    t0 = time.monotonic()
    try:
        tr.run()
        msg = "finished"
    except Exception:
        msg = "raised: " + traceback.format_exc(limit=1)
    with open(out_file, "w") as f:
        f.write(f"{time.monotonic() - t0:.1f} {msg}")


def test_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    ctx = mp.get_context("spawn")
    out = str(tmp_path / "rank0.txt")
    procs = [ctx.Process(target=_dying, args=(r, 2, str(tmp_path / "store"), out if r == 0 else out + ".1"))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung after its peer died")
    assert procs[1].exitcode == 3
    text = (tmp_path / "rank0.txt").read_text()
    assert "raised" in text, text


def test_rank_error_type_is_exported():
    assert issubclass(RankError, RuntimeError)
    assert ModelShape(layers=1, hidden=8, heads=2).ulysses_degrees(4) == [1, 2]


def test_megatron_indexed_dataset_reader(tmp_path):
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    docs = [np.arange(5), np.arange(100, 140), np.array([7, 8])]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int32)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    corpus = _one("indexed", prefix)
    assert corpus.sizes.tolist() == [5, 40, 2]
    for i, d in enumerate(docs):
        assert corpus.doc(i).tolist() == d.tolist()


def test_malformed_jsonl_lines_name_file_and_line(tmp_path):
    cases = [
        ('{"text": "ok"}\n{bad\n', "bad.jsonl:2: not a JSON object"),
        ('{"text": "ok"}\n{"text": 5}\n', "bad.jsonl:2: field 'text' is int; valid: a string"),
    ]
    for body, message in cases:
        (tmp_path / "bad.jsonl").write_text(body)
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            _one("jsonl", str(tmp_path / "bad.jsonl"))


def _frozen_rank(rank, world, tmp):
    """Rank 1 freezes inside its first micro-step; rank 0's collective times out (5 s here) and its error
    names the phase and rank 1."""
    import trainer.step as step_mod
    from trainer.loop import Trainer
    from trainer.watchdog import CollectiveTimeout

    tr = Trainer(_job(f"{tmp}/frozen", "ring", steps=2, use_milp=False))
    if rank == 1:
        real = step_mod.group_pass
        step_mod.group_pass = lambda *a, **k: (time.sleep(15), real(*a, **k))[1]
    try:
        tr.run()
    except CollectiveTimeout as e:
        return ("timeout", str(e))
    except Exception as e:  # noqa: BLE001 - the frozen rank fails once its peer has given up
        return ("other", f"{type(e).__name__}: {e}")
    return ("finished", "")


@pytest.mark.slow  # waits out a collective timeout
def test_frozen_rank_is_named_in_the_timeout(tmp_path):
    out = run_distributed(_frozen_rank, 2, str(tmp_path), timeout=120, collective_timeout=5)
    kind, msg = out[0]
    assert kind == "timeout", msg
    assert "rank 0: a collective timed out in step 0, phase 'micro-step 1/" in msg
    assert "rank 1: step 0, phase 'micro-step 1/" in msg and "did not reach it" in msg
