"""Execute one planned step on this rank: every micro-step's group shards its sequences and runs fwd/bwd.

The loss is the sum over this rank's real tokens divided by the step's global token count, so the sum of
all ranks' gradients (:class:`~trainer.grad_sync.GradSync`) is the exact gradient of the mean token loss.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from models.attention import SPPackedSeqParams
from planner.types import Assignment, StepPlan
from sp.groups import GroupPool
from sp.layout import shard
from trainer.grad_sync import GradSync


def my_group(groups: tuple[Assignment, ...], rank: int) -> Assignment | None:
    for g in groups:
        if g.first_rank <= rank < g.first_rank + g.shape.size:
            return g
    return None


def run_plan(
    model: torch.nn.Module,
    pool: GroupPool,
    plan: StepPlan,
    docs: list[np.ndarray],
    rank: int,
    sync: GradSync,
    kernel: str = "auto",
) -> tuple[torch.Tensor, list[float]]:
    """Returns this rank's token-loss sum (detached) and its busy seconds per micro-step."""
    global_tokens = sum(len(d) - 1 for d in docs)
    total = torch.zeros((), dtype=torch.float64)
    busy: list[float] = []
    for i, micro in enumerate(plan.micro_steps):
        if i == len(plan.micro_steps) - 1:
            sync.arm()
        g = my_group(micro.groups, rank)
        if g is None:
            busy.append(0.0)
            continue
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        inputs = torch.from_numpy(np.concatenate([docs[s][:-1] for s in g.seqs])).to(device)
        labels = torch.from_numpy(np.concatenate([docs[s][1:] for s in g.seqs])).to(device)
        cu = np.concatenate([[0], np.cumsum([len(docs[s]) - 1 for s in g.seqs])]).tolist()
        if kernel == "auto":  # flash block kernel on CUDA when flash_attn is importable, the reference otherwise
            kernel = "flash" if device.type == "cuda" and _has_flash() else "torch"
        ctx = pool.context(g.ranks, g.shape.ulysses, g.shape.ring, cu, kernel=kernel, check=False)
        tok = shard(inputs, ctx.layout, ctx.rank)
        lab = shard(labels, ctx.layout, ctx.rank)
        valid = (ctx.layout.token_index(ctx.rank) >= 0).to(device)
        params = SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx)
        # [tokens] -unsqueeze-> [1, tokens]: Megatron's batch dim; returns the per-token loss [1, tokens]
        per_token = model(tok[None], None, None, labels=lab[None], packed_seq_params=params)
        loss = (per_token[0] * valid).sum()
        (loss / global_tokens).backward()
        total += loss.detach().double()
        busy.append(time.perf_counter() - t0)
    sync.finish()
    return total, busy


def _has_flash() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
