"""Execute one planned step on this rank: every micro-step's group shards its sequences and runs fwd/bwd.

The loss is the sum over this rank's real tokens divided by the step's global token count, so the sum of
all ranks' gradients is the exact gradient of the mean token loss (FSDP's reduce-scatter with divide factor
1, or :class:`~trainer.grad_sync.GradSync` when replicated).

Under FSDP every rank runs one forward and backward per micro-step, since the layers' all-gathers and
reduce-scatters are world collectives: a rank the plan leaves idle (or whose group got no sequence) runs
an *empty pass*: one dummy token, no attention, loss times zero (zero gradients, same collectives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models import loss as chunked_loss
from models import moe, tiling
from models.attention import SPPackedSeqParams
from planner.types import Assignment, MicroStep, StepPlan
from sp.groups import GroupPool
from sp.layout import shard
from sp.step_tables import upload
from sp.timing import ATTENTION, COMM_WAIT, SpanTimer
from trainer.data.corpus import target_weights, trained_targets
from trainer.grad_sync import GradSync
from trainer.memory import SavedBytes
from trainer.sharding import checkpoint_switch

BUSY = "busy"  # a micro-step's forward and backward (a SpanTimer span)


@dataclass
class StepStats:
    """This rank's view of a step: token-loss sum (detached, on the model's device), and per micro-step the
    busy seconds (CUDA events on the GPU, read after the step's one synchronisation; wall-clock on the CPU) and
    bytes saved for backward (when counted)."""

    loss_sum: torch.Tensor
    aux_loss: float | torch.Tensor = 0.0  # MoE load-balancing loss of the step (global; models.moe), not in loss_sum
    busy_s: list[float] = field(default_factory=list)
    saved_bytes: list[int] = field(default_factory=list)
    offloaded_bytes: list[int] = field(default_factory=list)  # copied to host memory (checkpointing=offload)
    attention_s: list[float] = field(default_factory=list)  # sp.attention fwd + bwd (+ recompute), comm included
    comm_wait_s: list[float] = field(default_factory=list)  # blocked on all-to-all / ring transfers (CPU only)


def my_group(groups: tuple[Assignment, ...], rank: int) -> Assignment | None:
    for g in groups:
        if g.first_rank <= rank < g.first_rank + g.shape.size:
            return g
    return None


def prepare_groups(pool: GroupPool, micro: MicroStep) -> None:
    """The micro-step's process groups ready on every rank (collective: sp.groups.GroupPool.prepare)."""
    pool.prepare([(g.ranks, g.shape.ulysses) for g in micro.groups])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so host timers measure work and not kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_plan(
    model: torch.nn.Module,
    pool: GroupPool,
    plan: StepPlan,
    docs: list[np.ndarray],
    rank: int,
    sync: GradSync | None,
    *,
    kernel: str = "auto",
    autocast: torch.dtype | None = None,
    count_saved: bool = False,
    heartbeat: Callable[[str], None] | None = None,
) -> StepStats:
    """``sync=None`` means FSDP (gradients reduce-scatter inside backward, every rank in every micro-step);
    ``autocast`` runs the passes under ``torch.autocast`` (bf16 compute over replicated fp32 parameters);
    ``heartbeat(phase)`` is called before each micro-step (:class:`trainer.watchdog.Heartbeat`)."""
    device = next(model.parameters()).device
    global_tokens = max(1, trained_targets(docs))  # loss masks: only trained targets count
    stats = StepStats(torch.zeros((), dtype=torch.float64, device=device))
    kernel = resolve_kernel(kernel, device)
    switch = checkpoint_switch(model)
    timers: list[SpanTimer | None] = []  # per micro-step; read after the step's one device synchronisation
    routed = sum(len(d) - 1 for d in docs)  # tokens the MoE routers see in the step (the aux loss's weights)
    routers = moe.routers(model)
    for i, micro in enumerate(plan.micro_steps):
        if switch is not None:  # the plan's checkpointing for this micro-step (forward and its backward)
            switch.set(micro.checkpointing)
        elif micro.checkpointing not in ("", "none"):
            raise ValueError(f"the plan asks for checkpointing={micro.checkpointing!r}; the model has no wrappers")
        chunked_loss.set_chunk(model, micro.memory.loss_chunk_tokens if micro.memory is not None else None)
        tiling.set_tile(model, micro.memory.tile_tokens if micro.memory is not None else None)
        chunks = micro.memory.head_chunks if micro.memory is not None else getattr(model, "sp_head_chunks", 2)
        if sync is not None and i == len(plan.micro_steps) - 1:
            sync.arm()
        prepare_groups(pool, micro)
        g = my_group(micro.groups, rank)
        if heartbeat is not None:
            where = f"{g.shape} on ranks {g.ranks[0]}-{g.ranks[-1]}" if g is not None and g.seqs else "idle"
            heartbeat(f"micro-step {i + 1}/{len(plan.micro_steps)}: {where}")
        if (g is None or not g.seqs) and sync is not None:
            for s in (stats.saved_bytes, stats.offloaded_bytes):
                s.append(0)
            timers.append(None)
            if routers:  # the micro-step's aux-loss statistics are a world collective: take part with zeros
                moe.finish(None, device=device, layers=len(routers), experts=routers[0].config.num_moe_experts)
            continue
        if switch is not None:
            switch.offload.reset()
        meter = SavedBytes(model) if count_saved else None
        timer = SpanTimer(device)
        share = sum(len(docs[s]) - 1 for a in micro.groups for s in a.seqs) / max(1, routed)
        with timer.span(BUSY):  # CUDA events on the GPU: no host synchronisation inside the step
            with meter or contextlib.nullcontext(), autocast_to(device, autocast):
                if g is None or not g.seqs:
                    step = moe.begin(model, None, share)
                    loss = empty_pass(model, device)
                else:
                    loss, step = group_pass(
                        model, pool, g, docs, kernel, device, timer, meter, moe_share=share, head_chunks=chunks
                    )
            if step is not None:  # the load-balancing loss over the micro-step's tokens on every rank (collective)
                moe.finish(step)
                stats.aux_loss = stats.aux_loss + (step.aux if step.aux is not None else 0.0)
            (loss / global_tokens).backward()
        stats.loss_sum += loss.detach().double()
        timers.append(timer if g is not None and g.seqs else None)
        stats.saved_bytes.append(meter.bytes if meter is not None else 0)
        stats.offloaded_bytes.append(switch.offload.bytes if switch is not None else 0)
    moe.end(model)
    if switch is not None:
        switch.set("")  # back to the model's own mode for anything run outside a plan
    if sync is not None:
        sync.finish()
    synchronize(device)  # once per step: the micro-steps' events are then complete
    for t in timers:
        spans = t.totals() if t is not None else {}
        stats.busy_s.append(spans.get(BUSY, 0.0))
        stats.attention_s.append(spans.get(ATTENTION, 0.0))
        stats.comm_wait_s.append(spans.get(COMM_WAIT, 0.0))
    return stats


def group_pass(
    model: torch.nn.Module,
    pool: GroupPool,
    g: Assignment,
    docs: list[np.ndarray],
    kernel: str,
    device: torch.device,
    timer: SpanTimer | None = None,
    meter: SavedBytes | None = None,
    moe_share: float | None = None,
    head_chunks: int = 2,
) -> Any:
    """This rank's loss sum of group ``g``; ``meter`` also counts the micro-step's derived device tables (RoPE's
    cos/sin, shared by every layer and held by the SP context outside autograd's saves). With ``moe_share``
    (the micro-step's share of the step's tokens) the MoE routers' statistics are opened for the aux loss and
    ``(loss, MoEStep or None)`` is returned."""
    per_token, weights, ctx = group_losses(model, pool, g, docs, kernel, device, timer, moe_share, head_chunks)
    if meter is not None:
        meter.hold(ctx.tables.derived())
    loss = (per_token * weights).sum()
    return loss if moe_share is None else (loss, moe.current(model))


def group_losses(
    model: torch.nn.Module,
    pool: GroupPool,
    g: Assignment,
    docs: list[np.ndarray],
    kernel: str,
    device: torch.device,
    timer: SpanTimer | None = None,
    moe_share: float | None = None,
    head_chunks: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """This rank's per-token losses of group ``g``'s sequences (fp32, local tokens), their weights (0 on
    padding and masked targets) and the SP context (whose layout maps local rows to packed positions)."""
    inputs = torch.from_numpy(np.concatenate([docs[s][:-1] for s in g.seqs]))
    labels = torch.from_numpy(np.concatenate([docs[s][1:] for s in g.seqs]))
    weights = torch.from_numpy(np.concatenate([target_weights(docs[s]) for s in g.seqs]))
    cu = np.concatenate([[0], np.cumsum([len(docs[s]) - 1 for s in g.seqs])]).tolist()
    ctx = pool.context(g.ranks, g.shape.ulysses, g.shape.ring, cu, kernel=kernel, check=False, device=device,
                       timer=timer, head_chunks=head_chunks)  # fmt: skip
    # sharded on the host, then two uploads per micro-step: token ids with labels, and the weights
    pair = shard(torch.stack([inputs, labels], 1), ctx.layout, ctx.rank)  # [T, 2] -> [local, 2]
    both = upload(pair.T.contiguous(), device)  # [local, 2] -T-> [2, local]
    tok, lab = both[0].clone(), both[1].clone()  # storages of their own (what autograd saves is counted by storage)
    valid = upload(shard(weights, ctx.layout, ctx.rank), device)  # 0 on padding and on masked targets
    if moe_share is not None:  # the routers record this micro-step's statistics for the aux loss (real rows only)
        moe.begin(model, ctx.tables.valid_rows, moe_share)
    params = SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx)
    # [tokens] -unsqueeze-> [1, tokens]: Megatron's batch dim; returns the per-token loss [1, tokens]
    per_token = model(tok[None], None, None, labels=lab[None], packed_seq_params=params)
    return per_token[0].float(), valid, ctx


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``auto`` without a trainer's measured choice (:mod:`trainer.kernel_choice`): torch's fused CPU op on the
    CPU, torch's own flash varlen op on CUDA (in every CUDA build of torch; no extension to build)."""
    if kernel != "auto":
        return kernel
    return "torch_flash" if device.type == "cuda" else "cpu_fused"


def empty_pass(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """One dummy token through every layer (Megatron cannot reshape zero tokens): the rank joins FSDP's
    collectives and contributes exactly zero gradients."""
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
    params = SPPackedSeqParams(qkv_format="sbhd", sp_ctx=None)
    return model(tok, None, None, labels=tok, packed_seq_params=params).float().sum() * 0


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
