"""Teacher-forced scoring of retrieval tasks under the planner's plans: one forward per task, packed with others
into eval steps (document masking keeps packed tasks apart), a 512K task on an SP group like any sequence.

Every rank runs every micro-step (an idle rank runs FSDP's empty pass); for its local rows it records whether
the argmax at row p - 1 is the token at p (:func:`models.hits.hits_recorded`) and the target's log-probability
(minus its loss), for the rows whose target is one of its task's; one all-reduce gives every rank, per task,
the targets right, the targets counted and the log-probability sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.hits import hits_recorded
from trainer.tasks.needle import NeedleTask


def score(model: torch.nn.Module, pool: Any, plan_step: Any, tasks: list[NeedleTask], rank: int, tokens_per_step: int,
          kernel: str = "auto", autocast: torch.dtype | None = None) -> np.ndarray:  # fmt: skip
    """Collective: per task [n, 3]: targets right, targets counted, log-probability sum over the targets
    (:meth:`trainer.tasks.needle.NeedleGrid.of_sums`)."""
    from trainer.evaluate import reshard
    from trainer.step import autocast_to, resolve_kernel

    device = next(model.parameters()).device
    kernel = resolve_kernel(kernel, device)
    sums = torch.zeros(len(tasks), 3, dtype=torch.float64)  # per task: targets right, targets, log-prob sum
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_to(device, autocast):
            for ids in _steps([len(t.input_ids) - 1 for t in tasks], tokens_per_step):
                docs = [tasks[i].input_ids for i in ids]
                plan = plan_step([len(d) - 1 for d in docs])
                sums[ids] += _sums_of_plan(model, pool, plan, docs, [tasks[i].targets for i in ids], rank, kernel)
    finally:
        model.train(was_training)
        reshard(model)
    summed = sums.to(device)
    dist.all_reduce(summed)
    return summed.cpu().numpy()


def _steps(tokens: list[int], per_step: int) -> list[list[int]]:
    """Task indices in order, in steps of at most ``per_step`` tokens (at least one task each)."""
    out: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(tokens):
        if out[-1] and used + n > per_step:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return [s for s in out if s]


def _sums_of_plan(model: torch.nn.Module, pool: Any, plan: Any, docs: list[np.ndarray],
                  targets: list[tuple[int, ...]], rank: int, kernel: str) -> torch.Tensor:  # fmt: skip
    """This rank's [len(docs), 3] sums over one planned step."""
    from trainer.evaluate import forward_rows

    sums = torch.zeros(len(docs), 3, dtype=torch.float64)
    hits: list[torch.Tensor] = []
    for g, per_token, _, _, real, seq, pos in forward_rows(
        model, pool, plan, docs, rank, kernel, lambda: hits_recorded(model, hits)
    ):
        hit = hits[-1][0].cpu()  # [local] this rank's rows: argmax == label
        loss = per_token.detach().cpu()
        for j, s in enumerate(g.seqs):
            # row at position r predicts the token at r + 1 of its sequence: a target p is row p - 1
            rows = real[(seq == j) & torch.isin(pos + 1, torch.tensor(targets[s], dtype=torch.long))]
            sums[s, 0] += float(hit[rows].sum())
            sums[s, 1] += float(len(rows))
            sums[s, 2] -= float(loss[rows].double().sum())
    return sums
