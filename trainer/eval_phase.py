"""The trainer's evaluation phase: validation loss by position and source, and the evaluation tasks (needle
retrieval), forward only under the planner's plans (rank 0 plans, every rank runs every micro-step)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch.distributed as dist

from planner.planner import Planner
from planner.types import StepPlan


class EvalPhase:
    """Mixed into :class:`trainer.loop.Trainer`, whose state it reads (model, pool, loader, held-out documents,
    planner, board)."""

    job: Any
    rank: int
    step: int
    model: Any
    pool: Any
    loader: Any
    heldout: list
    eval_corpora: list
    cost: Any
    shape: Any
    kernel: Any
    autocast: Any
    board: Any
    out: Any
    last_eval_parts: dict
    last_needle_sums: np.ndarray

    def _plan(self, lengths: list[int]) -> StepPlan:
        raise NotImplementedError

    def evaluate(self, docs: list[np.ndarray] | None = None) -> Any:
        """Collective: validation loss (:mod:`trainer.evaluate`), forward only, under the planner's plans, on
        ``docs``, or by default on each training source's held-out documents and each ``eval.sources``
        source (``eval.max_docs`` documents of each, split at the step's length limit); rank 0 logs it."""
        from trainer import evaluate as ev

        e, d = self.job.eval, self.job.data
        sets = (
            {"documents": docs}
            if docs is not None
            else ev.eval_sets(self.loader.corpora, self.heldout, self.eval_corpora, e, d, max(0, self.step - 1))
        )
        per_set = {name: ev.eval_steps(ds, e.tokens_per_step or d.tokens_per_step) for name, ds in sets.items()}
        result, parts = ev.evaluate(
            self.model, self.pool, self._eval_plan, per_set, self.rank, self.kernel.name, self.autocast
        )  # under training's autocast: the same kernels, dtypes
        self.last_eval_parts = parts
        if self.rank == 0:
            ev.report(result, parts, self.step, self.board, self.out)
        return result

    def _eval_plan(self, lengths: list[int]) -> StepPlan:
        """Collective: an evaluation step's plan, made on rank 0 (not on the training planner's thread)."""
        if self.rank == 0 and not hasattr(self, "_eval_planner"):
            self._eval_planner = Planner(self.cost, self.job.planner)
        box: list = [None]
        if self.rank == 0:
            box[0] = self._eval_planner.plan(lengths) if self.shape is None else self._plan(lengths)
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def evaluate_needle(self, tasks: list | None = None) -> Any:
        """Collective: needle retrieval (:mod:`trainer.tasks`) by length and depth, teacher-forced, one forward
        per task under the planner's plans; ``tasks`` default to the grid of ``eval.needle`` built from the
        evaluation documents. Rank 0 reports it; returns the grid."""
        from trainer.tasks.needle import NeedleGrid
        from trainer.tasks.run import report
        from trainer.tasks.scoring import score

        e, d = self.job.eval, self.job.data
        t0 = time.perf_counter()
        tasks = self.needle_tasks() if tasks is None else tasks
        sums = score(self.model, self.pool, self._eval_plan, tasks, self.rank, e.tokens_per_step or d.tokens_per_step,
                     self.kernel.name, self.autocast)  # fmt: skip
        self.last_needle_sums = sums
        grid = NeedleGrid.of_sums(tasks, sums)
        if self.rank == 0:
            report(grid, self.step, self.board, self.out, time.perf_counter() - t0)
        return grid

    def needle_tasks(self) -> list:
        """The grid of ``eval.needle`` at this step's length limit, its haystack from the evaluation documents."""
        from trainer import evaluate as ev
        from trainer.tasks.run import needle_tasks

        e, d, step = self.job.eval, self.job.data, max(0, self.step - 1)
        sets = ev.eval_sets(self.loader.corpora, self.heldout, self.eval_corpora, e, d, step)
        return needle_tasks(e.needle, sets, d.max_len_at(step), d.tokenizer)
