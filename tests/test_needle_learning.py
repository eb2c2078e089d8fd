"""The needle score measures something: a tiny model trained on a mixture that includes retrieval examples
(prompt/completion rows: a haystack with a key-value needle and the query, the answer trained) rises from no
task right to well above chance at short lengths, while the same model before training is at chance or below.

The haystack is English text without digits (the Python documentation's help topics, digits removed), so the
one-digit value is the only digit in a task: retrieving it means finding it in the context, wherever the needle
sits. A model that ignores the context can do no better than guessing the digit, 1 in 10.

Measured here with this mixture (1 rank, ~0.4 s per step; each retrieval row trains 2 answer tokens, and ~10% of
a step's tokens are text): 1 and 3 of the 40 tasks right at steps 60 and 120 of a 240-step run, all 40 at steps 180
and 240. At lr 3e-3 the same model stalls at 6 of 10 digits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from trainer.data.corpus import encoder, pydoc_topics
from trainer.tasks.needle import NeedleConfig, build_tasks

BYTES = encoder(None)
LENGTHS = (192, 256)  # task lengths trained and scored
CHANCE = 0.1  # one digit, guessed


def _text(ids: np.ndarray) -> str:
    return bytes(ids.astype(np.uint8)).decode("utf-8")


def _sources(tmp: Path) -> tuple[Path, Path]:
    """A digit-free English filler source and a retrieval source of prompt/completion rows built by the
    needle generator from the filler (another seed than the scored grid)."""
    docs = [re.sub(r"[^ -~\n]|[0-9]", "", t) for t in pydoc_topics()]  # ASCII: one byte per character
    filler = tmp / "filler.jsonl"
    filler.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if len(d) > 300))
    pool = [BYTES(d) for d in docs]
    train = NeedleConfig(lengths=LENGTHS, depths=tuple(np.linspace(0, 1, 21)), samples=48, digits=1, seed=1000)
    rows = []
    for t in build_tasks(train, LENGTHS, pool, BYTES):
        cut = t.targets[0]
        rows.append({"prompt": _text(t.input_ids[:cut]), "completion": _text(t.input_ids[cut:])})
    retrieval = tmp / "retrieval.jsonl"
    retrieval.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return filler, retrieval


def _job(tmp: Path, steps: int):
    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from trainer.config import DataConfig, EvalConfig, SourceConfig, TrainConfig
    from trainer.loop import TrainJob

    filler, retrieval = _sources(tmp)
    needle = NeedleConfig(lengths=LENGTHS, depths=(0.0, 0.25, 0.5, 0.75, 1.0), samples=4, digits=1,
                          filler="filler", seed=7)  # fmt: skip
    return TrainJob(
        model=ModelShape(name="tiny", layers=2, hidden=128, heads=4, kv_heads=4, head_dim=32, ffn=512, vocab=256,
                         checkpointing="none", bytes_per_value=4),
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=1, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0),
        planner=PlannerConfig(use_milp=False),
        data=DataConfig(max_len=256, tokens_per_step=4096, seed=1, sources=(
            SourceConfig(name="retrieval", source="jsonl", path=str(retrieval), weight=0.9),
            SourceConfig(name="filler", source="jsonl", path=str(filler), weight=0.1, max_len=64))),
        train=TrainConfig(steps=steps, out_dir=str(tmp / "run"), progress=False, warmup_steps=20, lr=1e-3,
                          min_lr=3e-4, weight_decay=0.0, picture_every=0, checkpoint_every=0),
        eval=EvalConfig(every=steps // 4, holdout=0.1, max_docs=4, tasks=("needle",), needle=needle),
    )  # fmt: skip


def _train_and_score(rank, world, tmp, steps):
    from trainer.loop import Trainer

    tr = Trainer(_job(Path(tmp), steps))
    before = tr.evaluate_needle().json()  # the grid at the seed's initial weights
    tr.run()
    after = json.loads((Path(tmp) / "run" / "eval" / f"needle_step_{steps:06d}.json").read_text())
    return before, after


@pytest.mark.slow
def test_needle_accuracy_rises_above_chance_with_training(tmp_path):
    from tests.dist import run_distributed

    before, after = run_distributed(_train_and_score, 1, str(tmp_path), 300, timeout=900)[0]
    mean = lambda grid: float(np.mean(grid["accuracy"]))  # noqa: E731
    assert mean(before) <= CHANCE, f"untrained: {before['accuracy']}"
    assert mean(after) >= 0.8, f"trained 300 steps: {after['accuracy']}"
    assert min(min(row) for row in after["accuracy"]) >= 0.5, "at every length and depth"
    assert np.mean(after["logprob"]) > np.mean(before["logprob"]) + 3, "the answers' log-probability rises"
