"""Issue 22: a stop signal in every phase of a run, through the real entry point (torchrun, 2 ranks).

Each phase gets a real signal at a deterministic point (``SP_SIGNAL_AT_PHASE``, :mod:`trainer.preempt`); the
checks: exit code 0 where the run stops cleanly, the requeue path (no COMPLETE, the run's own checkpoints
only), no partial checkpoint visible as intact, and a resumed run's losses equal an unbroken run's. The
resume chain runs with asynchronous checkpoints (``train.async_checkpoint=true``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import integrity

PY = sys.executable
ARGS = ["train.steps=4", "train.checkpoint_every=2", "data.tokens_per_step=4096", "train.progress=false"]


def _launch(tmp: Path, out: str, phase: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "SP_SIGNAL"))}
    env["OMP_NUM_THREADS"] = "1"
    if phase:
        env["SP_SIGNAL_AT_PHASE"] = phase
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli.train",
           f"train.out_dir={tmp / out}", *ARGS, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)


def _losses(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"\[sp-train\] step (\d+)/\d+ loss (\S+)", text)}


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preempt")
    out = {"tmp": tmp, "full": _launch(tmp, "full", None, "train.preempt_warning_s=0.001")}
    out["start"] = _launch(tmp, "start", "start")
    out["save"] = _launch(tmp, "save", "save")  # USR1 while step 2's checkpoint is being written
    out["after_save"] = _checkpoints(tmp / "save")
    # asynchronous saves: step 2's write overlaps step 3; the step-4 write is killed half way on rank 1; a
    # restart gets TERM on rank 1 alone while loading; the next one resumes from step 2, and one more finds the
    # run finished
    chain = ("train.async_checkpoint=true",)
    out["kill"] = _launch(tmp, "chain", "save:KILL@1#2", *chain)
    out["after_kill"] = _checkpoints(tmp / "chain")
    out["load"] = _launch(tmp, "chain", "load:TERM@1", *chain)
    out["after_load"] = _checkpoints(tmp / "chain")
    out["resume"] = _launch(tmp, "chain", None, *chain)
    out["again"] = _launch(tmp, "chain", None, *chain)
    return out


def test_unbroken_run_and_the_preemption_budget_warning(runs):
    full = runs["full"]
    assert full.returncode == 0, full.stderr[-3000:]
    assert sorted(_losses(full.stdout)) == [1, 2, 3, 4]
    assert (runs["tmp"] / "full" / "COMPLETE").exists()
    assert "WARNING: preemption budget" in full.stdout and "--signal=B:USR1@" in full.stdout


def test_signal_before_any_import_exits_cleanly_before_the_first_step(runs):
    r = runs["start"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stop requested: SIGUSR1 during start-up (phase 'init')" in r.stdout
    assert "no step was run" in r.stdout and not _losses(r.stdout)
    assert not (runs["tmp"] / "start" / "COMPLETE").exists() and _checkpoints(runs["tmp"] / "start") == []


def test_signal_during_a_checkpoint_write_finishes_the_write_then_stops(runs):
    r = runs["save"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stop requested: checkpointed step 2" in r.stdout and sorted(_losses(r.stdout)) == [1, 2]
    assert runs["after_save"] == ["step_000002"]
    assert integrity.verify(runs["tmp"] / "save" / "checkpoints" / "step_000002") is None
    assert not (runs["tmp"] / "save" / "COMPLETE").exists()


def test_signal_to_one_rank_while_loading_stops_every_rank(runs):
    r = runs["load"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "SIGTERM during start-up (phase 'load')" in r.stdout  # rank 0 names it
    assert not _losses(r.stdout) and runs["after_load"] == ["step_000002", "step_000004.tmp"]


def test_a_write_killed_half_way_is_never_taken_as_intact(runs):
    assert runs["kill"].returncode != 0
    assert sorted(_losses(runs["kill"].stdout)) == [1, 2, 3, 4]
    assert runs["after_kill"] == ["step_000002", "step_000004.tmp"]
    assert not (runs["tmp"] / "chain" / "checkpoints" / "step_000004.tmp" / "MANIFEST.json").exists()
    r = runs["resume"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "(step 2)" in r.stdout


def test_resumed_losses_equal_the_unbroken_run(runs):
    full, resumed = _losses(runs["full"].stdout), _losses(runs["resume"].stdout)
    assert sorted(resumed) == [3, 4]
    assert {s: full[s] for s in (3, 4)} == resumed
    assert {s: full[s] for s in (1, 2)} == _losses(runs["save"].stdout)
    assert {s: full[s] for s in (1, 2, 3, 4)} == _losses(runs["kill"].stdout)  # async saves change no number
    assert (runs["tmp"] / "chain" / "COMPLETE").exists()


def test_rerunning_a_finished_run_says_so(runs):
    r = runs["again"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no step was trained (train.steps=4" in r.stdout and "nan" not in r.stdout
