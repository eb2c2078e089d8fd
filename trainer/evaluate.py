"""Validation: held-out documents, forward only, under the planner's plans; loss overall, by token position
and by document length.

The loss-versus-position curve is how one sees that a model uses long context: a model that does keeps lowering
its loss on tokens far into a document. Positions are the target's index in its training sequence (a document
split at ``data.max_len`` restarts at 0 in each piece, as it is trained). Buckets: 0-1K, 1-4K, 4-16K, 16-64K,
64K+ for positions, and the same edges for sequence lengths.

Every rank runs every micro-step's forward (an idle rank runs FSDP's empty pass), adds its local tokens'
losses into per-bucket sums, and one all-reduce gives every rank the totals. No gradient, no optimiser
state, no checkpoint and no data-loader position is touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from planner.types import StepPlan

EDGES = (0, 1024, 4096, 16384, 65536)
NAMES = ("0-1K", "1-4K", "4-16K", "16-64K", "64K+")


@dataclass(frozen=True)
class Evaluation:
    loss: float
    tokens: int
    by_position: dict[str, tuple[float, int]]  # bucket -> (mean loss, tokens)
    by_length: dict[str, tuple[float, int]]

    def scalars(self) -> dict[str, float]:
        out = {"eval/loss": self.loss, "eval/tokens": float(self.tokens)}
        out.update({f"eval/loss_position_{k}": v for k, (v, n) in self.by_position.items() if n})
        out.update({f"eval/loss_length_{k}": v for k, (v, n) in self.by_length.items() if n})
        return out

    def line(self) -> str:
        pos = ", ".join(f"{k} {v:.4f}" for k, (v, n) in self.by_position.items() if n)
        return f"loss {self.loss:.4f} over {self.tokens} tokens; by position: {pos}"


def bucket(values: torch.Tensor) -> torch.Tensor:
    """Bucket index (0..4) of each position or length."""
    return torch.bucketize(values, torch.tensor(EDGES[1:], dtype=values.dtype), right=True)


def eval_sets(corpora: list[Any], held_out: list[np.ndarray], eval_corpora: list[Any], e: Any, d: Any, step: int
              ) -> dict[str, list[np.ndarray]]:  # fmt: skip
    """The documents validation evaluates, by name: each training source's held-out documents and each
    ``eval.sources`` source's first documents (``eval.max_docs`` of each), split at step ``step``'s length
    limit as training splits them."""
    from trainer.data.corpus import doc_pieces

    max_len = d.max_len_at(step)
    sets = {c.src.name: doc_pieces(c, h[: e.max_docs], max_len, d.long_docs)
            for c, h in zip(corpora, held_out, strict=True) if len(h)}  # fmt: skip
    sets |= {c.src.name: doc_pieces(c, np.arange(min(e.max_docs, len(c))), max_len, d.long_docs)
             for c in eval_corpora}  # fmt: skip
    return sets


def report(result: Evaluation, parts: dict[str, Evaluation], step: int, board: Any, out: Any) -> None:
    """Rank 0: the log line, TensorBoard scalars (overall, and per named set when there are several) and the
    loss-by-position picture (also a PNG in ``out/eval``)."""
    print(f"[sp-train] eval at step {step}: {result.line()}", flush=True)
    several = len(parts) > 1
    if several:
        for name, part in parts.items():
            print(f"[sp-train]   {name}: {part.line()}", flush=True)
    if board is None:
        return
    values = result.scalars()
    if several:
        for name, part in parts.items():
            values |= {k.replace("eval/", f"eval/{name}/", 1): v for k, v in part.scalars().items()}
    board.scalars(step, values)
    fig = picture(result, step, parts if several else {})
    (out / "eval").mkdir(exist_ok=True)
    fig.savefig(out / "eval" / f"loss_by_position_step_{step:06d}.png", dpi=100)
    board.figure("eval/loss_by_position", step, fig)


def eval_steps(docs: list[np.ndarray], tokens_per_step: int) -> list[list[np.ndarray]]:
    """The documents in order, in steps of at most ``tokens_per_step`` training tokens (at least one each)."""
    steps: list[list[np.ndarray]] = [[]]
    used = 0
    for d in docs:
        if steps[-1] and used + len(d) - 1 > tokens_per_step:
            steps.append([])
            used = 0
        steps[-1].append(d)
        used += len(d) - 1
    return [s for s in steps if s]


Wrap = Callable[[], contextlib.AbstractContextManager]


def forward_rows(model: torch.nn.Module, pool: Any, plan: StepPlan, docs: list[np.ndarray], rank: int, kernel: str,
                 wrap: Wrap = contextlib.nullcontext) -> Iterator[tuple]:  # fmt: skip
    """Collective (under FSDP): the forward of every micro-step of a planned step, inside ``wrap()``; an idle
    rank runs FSDP's empty pass. Yields, for this rank's groups: (group, per-token loss [local], weights [local],
    SP context, the real rows [R] (local indices), the group-sequence index of each [R], its position [R])."""
    from trainer.step import empty_pass, group_losses, my_group, prepare_groups

    device = next(model.parameters()).device
    for micro in plan.micro_steps:
        prepare_groups(pool, micro)
        g = my_group(micro.groups, rank)
        if g is None or not g.seqs:
            empty_pass(model, device)
            continue
        with wrap():
            per_token, weights, ctx = group_losses(model, pool, g, docs, kernel, device)
        idx = ctx.layout.token_index(ctx.rank).cpu()  # packed position of each local row, -1 on padding
        lengths = torch.tensor([len(docs[s]) - 1 for s in g.seqs])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        real = torch.nonzero(idx >= 0)[:, 0]
        seq = torch.searchsorted(cu, idx[real], right=True) - 1  # which sequence each real row belongs to
        yield g, per_token, weights, ctx, real, seq, idx[real] - cu[seq]


def sums_of_plan(model: torch.nn.Module, pool: Any, plan: StepPlan, docs: list[np.ndarray], rank: int,
                 kernel: str) -> torch.Tensor:  # fmt: skip
    """This rank's [2 kinds, 5 buckets, (loss sum, tokens)] over one planned step (collective under FSDP)."""
    sums = torch.zeros(2, len(EDGES), 2, dtype=torch.float64)
    for g, per_token, weights, _, real, seq, pos in forward_rows(model, pool, plan, docs, rank, kernel):
        lengths = torch.tensor([len(docs[s]) - 1 for s in g.seqs])
        w = weights.cpu()[real].double()
        loss = per_token.detach().cpu()[real].double() * w
        for kind, values in enumerate((pos, lengths[seq])):
            b = bucket(values)
            sums[kind, :, 0].index_add_(0, b, loss)
            sums[kind, :, 1].index_add_(0, b, w)
    return sums


def summarise(sums: torch.Tensor) -> Evaluation:
    """Totals -> means (``sums``: [2, 5, 2] after the all-reduce)."""

    def means(kind: int) -> dict[str, tuple[float, int]]:
        return {name: (float(s / n) if n else float("nan"), int(n)) for name, (s, n) in zip(NAMES, sums[kind].tolist(),
                strict=True)}  # fmt: skip

    total, n = sums[0, :, 0].sum().item(), sums[0, :, 1].sum().item()
    return Evaluation(total / n if n else float("nan"), int(n), means(0), means(1))


def evaluate(model: torch.nn.Module, pool: Any, plan_step: Any, sets: dict[str, list[list[np.ndarray]]], rank: int,
             kernel: str = "auto", autocast: torch.dtype | None = None
             ) -> tuple[Evaluation, dict[str, Evaluation]]:  # fmt: skip
    """Collective: every step of every named set planned by ``plan_step(lengths)`` (the same plan on every
    rank), forward only, under ``autocast`` as training runs (replicated bf16: the kernels get bf16); the
    whole evaluation and each set's (one all-reduce)."""
    from trainer.step import autocast_to, resolve_kernel

    device = next(model.parameters()).device
    kernel = resolve_kernel(kernel, device)
    sums = torch.zeros(len(sets), 2, len(EDGES), 2, dtype=torch.float64)  # [set, position | length, bucket, sum | n]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_to(device, autocast):
            for i, steps in enumerate(sets.values()):
                for docs in steps:
                    sums[i] += sums_of_plan(model, pool, plan_step([len(d) - 1 for d in docs]), docs, rank, kernel)
    finally:
        model.train(was_training)
        reshard(model)
    total = sums.to(device)
    dist.all_reduce(total)
    total = total.cpu()
    return summarise(total.sum(0)), {name: summarise(total[i]) for i, name in enumerate(sets)}


def reshard(model: torch.nn.Module) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward with no backward (it expects the backward
    next): free them, so evaluation leaves the memory and the parameters as training had them."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def picture(ev: Evaluation, step: int, parts: dict[str, Evaluation] | None = None) -> Any:
    """Loss versus token position (a matplotlib figure): the long-context curve, overall and per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, e in [("all", ev), *(parts or {}).items()]:
        names = [k for k, (_, n) in e.by_position.items() if n]
        ax.plot(names, [e.by_position[k][0] for k in names], marker="o", label=label)
    if parts:
        ax.legend(fontsize=8)
    ax.set_xlabel("target position in its sequence")
    ax.set_ylabel("validation loss")
    ax.set_title(f"step {step}: loss by position ({ev.tokens} tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
