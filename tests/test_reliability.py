"""Issue 12: checkpoints that cannot silently corrupt a run, one run per folder, validated options."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.dist import run_distributed
from tests.test_trainer import _job


def _train(tmp, name, steps, **train):
    from trainer.loop import Trainer

    job = _job(f"{tmp}/{name}", "adaptive", steps, use_milp=False, resume=True)
    tr = Trainer(replace(job, train=replace(job.train, **train)))
    return tr, tr.run()


def _scenarios(rank, world, tmp):
    import torch.distributed as dist

    import trainer.loop as loop
    from trainer.loop import Trainer

    out = {}
    # 1. corrupted newest checkpoint (written asynchronously): resume falls back to the newest intact one
    _train(tmp, "corrupt", 2, checkpoint_every=1, async_checkpoint=True)
    if rank == 0:
        shard = sorted((Path(tmp) / "corrupt/checkpoints/step_000002").glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[100:120] = bytes(20)  # zeros: the checksum changes
        shard.write_bytes(bytes(data))
    dist.barrier()
    tr = Trainer(replace(_job(f"{tmp}/corrupt", "adaptive", 3, use_milp=False, resume=True)))
    out["corrupt_resumed_at"] = tr.step
    out["corrupt_losses"] = tr.run()
    # 2. non-finite parameters stop the run before any checkpoint
    orig = loop.lr_at
    loop.lr_at = lambda step, t: float("inf")
    try:
        _train(tmp, "nan", 2, checkpoint_every=1)
        out["nan"] = None
    except RuntimeError as e:
        out["nan"] = str(e)
    finally:
        loop.lr_at = orig
    out["nan_checkpoints"] = sorted(p.name for p in (Path(tmp) / "nan/checkpoints").glob("step_*"))
    # 3. a stale COMPLETE is removed; a stop for requeue writes none
    if rank == 0:
        (Path(tmp) / "stale").mkdir()
        (Path(tmp) / "stale/COMPLETE").write_text("20\n")
    dist.barrier()
    tr = Trainer(_job(f"{tmp}/stale", "adaptive", 5, use_milp=False))
    tr.request_stop()
    tr.run()
    out["stale_complete_after_stop"] = (Path(tmp) / "stale/COMPLETE").exists()
    out["stopped_at"] = tr.step
    # 4. two runs in one folder: the second fails at once
    first = Trainer(_job(f"{tmp}/shared", "adaptive", 1, use_milp=False))
    try:
        Trainer(_job(f"{tmp}/shared", "adaptive", 1, use_milp=False))
        out["second"] = None
    except RuntimeError as e:
        out["second"] = str(e)
    first.run()  # releases the lock
    out["after_release"] = len(Trainer(_job(f"{tmp}/shared", "adaptive", 1, use_milp=False)).run())
    # 5. resume into a different run: refused with the differences; a safe change is accepted
    try:
        Trainer(_job(f"{tmp}/corrupt", "ring", 6, use_milp=False, resume=True))
        out["changed"] = None
    except ValueError as e:
        out["changed"] = str(e)
    out["more_steps"] = len(_train(tmp, "corrupt", 4)[1])
    # 6. the launcher dies (orphaned workers): checkpoint and stop after the current step
    tr = Trainer(_job(f"{tmp}/orphan", "adaptive", 5, use_milp=False))
    tr._parent = -1  # as if torchrun's agent had been killed
    tr.run()
    out["orphan"] = (tr.step, tr.stopped, sorted(p.name for p in (Path(tmp) / "orphan/checkpoints").glob("step_*")))
    out["data"] = _changed_data(rank, tmp)
    out["phases"] = _start_up_phases(rank, tmp)
    return out


def _changed_data(rank, tmp):
    """Same config, same path, other content: the resume is refused with the fingerprint's difference."""
    import numpy as np
    import torch.distributed as dist

    from trainer.loop import Trainer

    docs = Path(tmp) / "docs"
    if rank == 0:
        docs.mkdir()
        rng = np.random.default_rng(0)
        for i in range(3):
            (docs / f"{i}.txt").write_bytes(bytes(rng.integers(32, 127, 700, dtype=np.uint8)))
    dist.barrier()
    job = _job(f"{tmp}/data", "adaptive", 1, use_milp=False, resume=True)
    job = replace(job, data=replace(job.data, source="glob", path=str(docs / "*.txt"), tokens_per_step=1500))
    Trainer(job).run()
    refusals = []
    for change in ("edit", "add"):
        if rank == 0 and change == "edit":  # same lengths, other bytes (sed -i 's/a/b/g'): only the content differs
            original = (docs / "0.txt").read_bytes()
            (docs / "0.txt").write_bytes(original.replace(b"a", b"b") if b"a" in original else b"a" + original[1:])
        if rank == 0 and change == "add":
            (docs / "0.txt").write_bytes(original)
            (docs / "3.txt").write_bytes(b"one more document")
        dist.barrier()
        try:
            Trainer(replace(job, train=replace(job.train, steps=2)))
            refusals.append(None)
        except ValueError as e:
            refusals.append(str(e))
        dist.barrier()
    return refusals


def _start_up_phases(rank, tmp):
    """USR1 to rank 0 alone at each start-up phase: every rank stops there, the folder's lock is released."""
    import os
    import signal

    from trainer.loop import Trainer
    from trainer.preempt import SIGNALS, Preemption, StopBeforeStart

    seen = {}
    try:
        for phase in ("init", "build", "data", "load"):
            os.environ["SP_SIGNAL_AT_PHASE"] = f"{phase}@0"
            try:
                Trainer(_job(f"{tmp}/phases", "adaptive", 1, use_milp=False), Preemption().install())
                seen[phase] = None
            except StopBeforeStart as e:
                seen[phase] = e.phase
        os.environ.pop("SP_SIGNAL_AT_PHASE")
        seen["after"] = len(Trainer(_job(f"{tmp}/phases", "adaptive", 1, use_milp=False)).run())
    finally:
        os.environ.pop("SP_SIGNAL_AT_PHASE", None)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    return seen


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_scenarios, 2, str(tmp_path_factory.mktemp("rel")), timeout=300)


def test_corrupted_checkpoint_falls_back_to_the_newest_intact_one(results):
    assert results[0]["corrupt_resumed_at"] == 1 and len(results[0]["corrupt_losses"]) == 2


def test_non_finite_parameters_never_reach_a_checkpoint(results):
    assert "hold NaN/inf after the optimizer step" in results[0]["nan"]
    assert results[0]["nan_checkpoints"] == []


def test_stale_complete_removed_and_requeue_stop_is_not_complete(results):
    assert results[0]["stale_complete_after_stop"] is False and results[0]["stopped_at"] == 1


def test_second_run_in_one_folder_fails_then_lock_is_released(results):
    assert "is in use by another run (pid" in results[0]["second"]
    assert results[0]["after_release"] == 1


def test_resume_into_a_different_run_is_refused(results):
    msg = results[0]["changed"]
    assert "train.strategy: 'adaptive' -> 'ring'" in msg and "new train.out_dir" in msg
    assert "train.steps" not in msg  # a safe difference is not a reason to refuse
    assert results[0]["more_steps"] == 1


def test_orphaned_workers_checkpoint_and_stop(results):
    assert results[0]["orphan"] == (1, True, ["step_000001"])


def test_resume_on_changed_data_is_refused_with_the_difference(results):
    for r in results:
        edited, added = r["data"]
        assert edited is not None and "trained on other data" in edited, edited
        diffs = edited.split("Differences:\n")[1].splitlines()[:-1]  # the last line is the advice
        assert len(diffs) == 1 and "content_xxh3_128" in diffs[0], diffs  # only the bytes changed
        assert added is not None and "trained on other data" in added
        assert "documents 3 -> 4" in added and "sizes_xxh3_128" in added and "tokens 2100 -> 2117" in added


def test_stop_at_each_start_up_phase_stops_every_rank_and_frees_the_folder(results):
    for r in results:
        assert r["phases"] == {"init": "init", "build": "build", "data": "data", "load": "load", "after": 1}


def test_crafted_extra_pt_cannot_run_code(tmp_path):
    """extra.pt loads with weights_only=True: a pickle that would run code is refused."""
    import pickle

    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "extra.pt"
    with open(path, "wb") as f:
        pickle.dump({"step": 1, "x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()
    src = (Path(__file__).resolve().parents[1] / "trainer/checkpoint.py").read_text()
    assert 'torch.load(path / "extra.pt", weights_only=True)' in src


def test_manifest_detects_changed_and_missing_files(tmp_path):
    from trainer.checkpoint import verify, write_manifest

    (tmp_path / "a.distcp").write_bytes(b"x" * 100)
    (tmp_path / "extra.pt").write_bytes(b"y")
    assert "MANIFEST.json is missing" in verify(tmp_path)
    write_manifest(tmp_path)
    assert verify(tmp_path) is None
    (tmp_path / "a.distcp").write_bytes(b"x" * 99 + b"z")
    assert "a.distcp does not match its checksum" in verify(tmp_path)
    (tmp_path / "extra.pt").unlink()
    assert json.loads((tmp_path / "MANIFEST.json").read_text())["files"]["extra.pt"]["bytes"] == 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("grad_clip", -1.0, "train.grad_clip=-1.0; valid: a finite number > 0"),
        ("steps", 0, "train.steps=0; valid: an integer >= 1"),
        ("log_every", 0, "train.log_every=0; valid: an integer >= 1"),
        ("collective_timeout_s", 0.0, "train.collective_timeout_s=0.0; valid: a finite number > 0"),
        ("lr", float("inf"), "train.lr=inf; valid: a finite number > 0"),
        ("min_lr", float("nan"), "train.min_lr=nan; valid: a finite number >= 0"),
        ("checkpoint_every", -1, "train.checkpoint_every=-1; valid: an integer >= 0"),
    ],
)
def test_options_are_validated_where_declared(field, value, message):
    from trainer.config import TrainConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{field: value})


def test_hybrid_needs_four_gpus_per_group():
    from trainer.config import TrainConfig

    with pytest.raises(ValueError, match="strategy='hybrid' needs train.sp_size >= 4"):
        TrainConfig(strategy="hybrid", sp_size=2)


def test_hybrid_on_a_two_gpu_world_is_refused_not_run_as_ring():
    """sp_size=0 (the whole world) on 2 ranks: the shape check itself refuses, not only the config field."""
    from trainer.loop import static_shape

    job = _job("/nonexistent", "hybrid")
    with pytest.raises(ValueError, match="strategy 'hybrid' needs groups of >= 4 GPUs"):
        static_shape(job, 2)
    assert static_shape(job, 4).ulysses == 2
