"""``sp-bench needle-learning``: does the needle score move when a model learns to retrieve?

A tiny model (2 layers, 128 wide, byte-level) is trained by the real trainer on 1 rank on a mixture of
retrieval rows (prompt/completion: a haystack of English text without digits, a key-value needle with a
one-digit value at a random depth, the query; only the answer is trained; 90% of the tokens) and plain text
(10%), and the needle grid (``eval.needle``: another seed than the training rows) is scored at step 0 and at
every quarter of the run. The haystack is the Python documentation's help topics with digits removed, so the
value is the only digit in a task: a model that ignores the context can only guess it, 1 in 10. One JSON object
per evaluation (the grid and its means); ``--png`` keeps the last heatmap.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.corpus import encoder, pydoc_topics
from trainer.tasks.needle import NeedleConfig, build_tasks

BYTES = encoder(None)
TRAIN_LENGTHS = (192, 256)  # lengths of the training rows (and the default grid)


def _text(ids: np.ndarray) -> str:
    return bytes(ids.astype(np.uint8)).decode("utf-8")


def sources(tmp: Path) -> tuple[Path, Path]:
    """A digit-free English filler source and a retrieval source of prompt/completion rows built by the needle
    generator from the filler."""
    docs = [re.sub(r"[^ -~\n]|[0-9]", "", t) for t in pydoc_topics()]  # ASCII: one byte per character
    filler = tmp / "filler.jsonl"
    filler.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if len(d) > 300))
    pool = [BYTES(d) for d in docs]
    train = NeedleConfig(lengths=TRAIN_LENGTHS, depths=tuple(np.linspace(0, 1, 21)), samples=48, digits=1, seed=1000)
    rows = []
    for t in build_tasks(train, TRAIN_LENGTHS, pool, BYTES):
        cut = t.targets[0]
        rows.append({"prompt": _text(t.input_ids[:cut]), "completion": _text(t.input_ids[cut:])})
    retrieval = tmp / "retrieval.jsonl"
    retrieval.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return filler, retrieval


def job(tmp: Path, steps: int, lengths: tuple[int, ...] = TRAIN_LENGTHS, lr: float = 1e-3) -> Any:
    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from trainer.config import DataConfig, EvalConfig, SourceConfig, TrainConfig
    from trainer.loop import TrainJob

    filler, retrieval = sources(tmp)
    needle = NeedleConfig(lengths=lengths, depths=(0.0, 0.25, 0.5, 0.75, 1.0), samples=4, digits=1,
                          filler="filler", seed=7)  # fmt: skip
    return TrainJob(
        model=ModelShape(name="tiny", layers=2, hidden=128, heads=4, kv_heads=4, head_dim=32, ffn=512, vocab=256,
                         checkpointing="none", bytes_per_value=4),
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=1, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0),
        planner=PlannerConfig(use_milp=False),
        data=DataConfig(max_len=max(TRAIN_LENGTHS), tokens_per_step=4096, seed=1, sources=(
            SourceConfig(name="retrieval", source="jsonl", path=str(retrieval), weight=0.9),
            SourceConfig(name="filler", source="jsonl", path=str(filler), weight=0.1, max_len=64))),
        train=TrainConfig(steps=steps, out_dir=str(tmp / "run"), progress=False, warmup_steps=20, lr=lr,
                          min_lr=lr * 0.3, weight_decay=0.0, picture_every=0, checkpoint_every=0),
        eval=EvalConfig(every=steps // 4, holdout=0.1, max_docs=4, tasks=("needle",), needle=needle),
    )  # fmt: skip


def train_and_score(rank: int, world: int, tmp: str, steps: int, lengths: tuple[int, ...], lr: float) -> list[dict]:
    """The grid before training and at every evaluation of the run (rank 0's reports)."""
    from trainer.loop import Trainer

    tr = Trainer(job(Path(tmp), steps, lengths, lr))
    before = {**tr.evaluate_needle().json(), "step": 0}  # the seed's initial weights
    tr.run()
    files = sorted((Path(tmp) / "run" / "eval").glob("needle_step_*.json"))
    return [before] + [json.loads(f.read_text()) for f in files if not f.stem.endswith("000000")]


def run(steps: int, lengths: tuple[int, ...], lr: float, png: str | None) -> list[dict]:
    from sp.spawn import run_distributed

    tmp = tempfile.mkdtemp(prefix="needle-learning-")
    grids = run_distributed(train_and_score, 1, tmp, steps, lengths, lr, timeout=3600)[0]
    if png:
        last = sorted((Path(tmp) / "run" / "eval").glob("needle_step_*.png"))[-1]
        shutil.copyfile(last, png)
    shutil.rmtree(tmp, ignore_errors=True)
    return [{"bench": "needle-learning", "steps": steps, "lr": lr, **g} for g in grids]
