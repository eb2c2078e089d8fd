"""The needle task inside training and on checkpoints: its tasks from the run's evaluation documents, and the
report (one JSON line in the log, TensorBoard scalars and heatmap, a PNG and a JSON file in ``eval/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trainer.tasks.needle import NeedleConfig, NeedleGrid, NeedleTask, build_tasks


def needle_tasks(cfg: NeedleConfig, sets: dict[str, list[np.ndarray]], max_len: int, tokenizer: str | None,
                 lengths: tuple[int, ...] = ()) -> list[NeedleTask]:  # fmt: skip
    """The grid's tasks, the haystack from the evaluation documents (``sets``: name -> documents; the one named
    ``eval.needle.filler``, or all)."""
    from trainer.data.corpus import encoder

    if cfg.filler and cfg.filler not in sets:
        raise ValueError(f"eval.needle.filler={cfg.filler!r}; valid: one of the evaluated sources {sorted(sets)} "
                         "or '' (all of them)")  # fmt: skip
    docs = sets[cfg.filler] if cfg.filler else [d for ds in sets.values() for d in ds]
    return build_tasks(cfg, lengths or cfg.grid_lengths(max_len), docs, encoder(tokenizer))


def report(grid: NeedleGrid, step: int, board: Any, out: Path, seconds: float) -> None:
    """Rank 0: the log line (JSON), the scalars and the heatmap."""
    body = {**grid.json(), "step": step, "seconds": round(seconds, 3)}
    print(f"[sp-train] needle at step {step}: {json.dumps(body)}", flush=True)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / f"needle_step_{step:06d}.json").write_text(json.dumps(body))
    fig = grid.heatmap(f"step {step}: needle accuracy (mean {grid.mean_accuracy:.2f}, {grid.samples} per cell)")
    fig.savefig(out / "eval" / f"needle_step_{step:06d}.png", dpi=100)
    if board is not None:
        board.scalars(step, grid.scalars() | {"needle/seconds": seconds})
        board.figure("needle/heatmap", step, fig)
