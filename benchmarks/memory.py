"""``sp-bench memory``: measured vs predicted per-rank memory of the trainer's regime (FSDP2 + checkpointing).

For each model, world P, checkpointing mode, strategy and token count: the trainer's model (Megatron GPT,
``trainer.sharding.parallelize``) runs one packed long-tailed micro-step forward on one SP group of all P
ranks under :class:`trainer.memory.SavedBytes` (forward only: the saved bytes are final when it ends).
``act_bytes_measured`` is the largest rank's bytes saved for backward; ``act_bytes_predicted`` is the
planner's :meth:`CostModel.saved_bytes_per_token` times tokens / P (the planner does not see the layout's
per-sequence padding). States: after one optimizer step, this rank's
fp32 parameter, gradient and AdamW-moment bytes vs :meth:`CostModel.state_bytes` (exact FSDP2 shard sizes);
the worst rank's difference is reported. ``--techniques`` adds cases with chunked loss (``chunk``: 1024-token
chunks), tiled MLP (``tile``: 1024-token tiles), activation offload (``offload``: full checkpointing with
the layer inputs on the host) or all three (``all``); ``offload_bytes_measured`` (what the layers copied to
the host, worst rank) is compared with :meth:`CostModel.host_bytes_per_token` times tokens / P. One JSON
object per case.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from planner.types import ModelShape

MODELS = {
    "tiny": ModelShape(name="tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
                       bytes_per_value=4),
    "mid": ModelShape(name="mid", layers=4, hidden=512, heads=8, kv_heads=2, ffn=1408, vocab=256, bytes_per_value=4),
}  # fmt: skip


TECHNIQUES = {
    "plain": {},
    "chunk": {"loss_chunk_tokens": 1024},
    "tile": {"tile_tokens": 1024},
    "offload": {"checkpointing": "offload"},
    "all": {"loss_chunk_tokens": 1024, "tile_tokens": 1024, "checkpointing": "offload"},
}


def batch_lengths(total: int) -> list[int]:
    """Long-tailed packed batch: one sequence of half the tokens, the rest in 16 short ones."""
    rest = total - total // 2
    return [total // 2] + [rest // 16 + (1 if i < rest % 16 else 0) for i in range(16)]


def layouts(model: ModelShape, world: int) -> list[tuple[str, int, int]]:
    """(strategy, u, r) of one group of all ``world`` ranks, where the heads allow the Ulysses degree."""
    if world == 1:
        return [("none", 1, 1)]
    out = [("ring", 1, world)]
    if world in model.ulysses_degrees(world):
        out.insert(0, ("ulysses", world, 1))
    if world >= 4:
        out.append(("hybrid", 2, world // 2))
    return out


def _worker(rank: int, world: int, cases: list[tuple[str, str, str, list[int], str]]) -> list[dict]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from models.gpt import build_gpt
    from planner.cost import CostModel
    from planner.types import Assignment, Cluster, GroupShape
    from sp.groups import GroupPool
    from trainer.memory import SavedBytes, state_bytes
    from trainer.sharding import Regime, checkpoint_switch, parallelize
    from trainer.step import group_pass

    parallel_state.initialize_model_parallel(1, 1)
    pool = GroupPool()
    cpu = torch.device("cpu")
    rows = []
    for name, ckpt, precision, tokens_list, technique in cases:
        shape = replace(MODELS[name], checkpointing=ckpt, bytes_per_value=2 if precision == "bf16" else 4)
        shape = replace(shape, **TECHNIQUES[technique])
        ckpt = shape.checkpointing
        model = parallelize(build_gpt(shape, max(tokens_list)), Regime("fsdp", precision, ckpt), cpu)
        switch = checkpoint_switch(model)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        cost = CostModel(Cluster(name="cpu", nodes=1, gpus_per_node=world), shape, sharding="fsdp")
        rng = np.random.default_rng(0)
        warm = [rng.integers(0, shape.vocab, size=65)]
        group_pass(model, pool, Assignment(0, GroupShape(1, world), (0,), 0, 0), warm, "torch", cpu).backward()
        optim.step()  # creates the AdamW moments
        states = sum(state_bytes(model, optim).values())
        state_err = torch.tensor([abs(states - cost.state_bytes(rank))], dtype=torch.float64)
        dist.all_reduce(state_err, op=dist.ReduceOp.MAX)
        for strategy, u, r in layouts(shape, world):
            for total in tokens_list:
                docs = [rng.integers(0, shape.vocab, size=n + 1) for n in batch_lengths(total)]
                g = Assignment(0, GroupShape(u, r), tuple(range(len(docs))), 0.0, 0.0)
                if switch is not None:
                    switch.offload.reset()
                with SavedBytes(model) as meter:
                    loss = group_pass(model, pool, g, docs, "torch", cpu, meter=meter)
                del loss  # forward only: what is saved is known once the forward ends (backward: 2/3 of the time)
                off = switch.offload.bytes if switch is not None else 0
                worst = torch.tensor([float(meter.bytes), float(off)], dtype=torch.float64)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                predicted = cost.saved_bytes_per_token(u) * total / world
                off_predicted = cost.host_bytes_per_token() * total / world
                rows.append({
                    "case": f"{name}/P{world}/{strategy}/u{u}r{r}/{total // 1024}K/{ckpt}/{precision}/{technique}",
                    "model": name, "world": world, "strategy": strategy, "u": u, "r": r, "tokens": total,
                    "checkpointing": ckpt, "precision": precision, "technique": technique,
                    "act_bytes_measured": int(worst[0].item()), "act_bytes_predicted": int(predicted),
                    "act_error": worst[0].item() / predicted - 1.0,
                    "offload_bytes_measured": int(worst[1].item()), "offload_bytes_predicted": int(off_predicted),
                    "state_bytes_measured": int(states), "state_bytes_predicted": int(cost.state_bytes(rank)),
                    "state_bytes_max_abs_diff_over_ranks": int(state_err.item()),
                    "working_bytes_predicted": int(cost.working_bytes_per_token(u, r) * total / world),
                })  # fmt: skip
        del model, optim
    return rows


def run(worlds: list[int], models: list[str], tokens: list[int], checkpointing: list[str], precisions: list[str],
        mid_max_tokens: int, techniques: tuple[str, ...] = ("plain",)) -> list[dict]:  # fmt: skip
    from sp.spawn import run_distributed

    rows: list[dict] = []
    for world in worlds:
        cases = []
        for name in models:
            toks = [t for t in tokens if name != "mid" or t <= mid_max_tokens]
            cases += [(name, ck, prec, toks, tech) for ck in checkpointing for prec in precisions for tech in techniques
                      if tech == "plain" or ck == "full"]  # offload is full checkpointing's variant  # fmt: skip
        rows += run_distributed(_worker, world, cases, timeout=3600)[0]
    return rows


def _fsdp_worker(rank: int, world: int, models: list[str], precisions: list[str]) -> list[dict]:
    """FSDP2's unsharded parameters and gradients, measured over one forward + backward (full
    checkpointing) with :class:`trainer.memory.FsdpUnsharded`, against :meth:`CostModel.fsdp_unsharded_bytes`
    with no prefetch (what gloo on the CPU does); the worst rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from models.gpt import build_gpt
    from planner.cost import CostModel
    from planner.types import Assignment, Cluster, GroupShape
    from sp.groups import GroupPool
    from trainer.fsdp_traffic import FsdpTraffic
    from trainer.memory import FsdpUnsharded
    from trainer.sharding import Regime, parallelize
    from trainer.step import group_pass

    parallel_state.initialize_model_parallel(1, 1)
    pool, cpu, rows = GroupPool(), torch.device("cpu"), []
    for name in models:
        for precision in precisions:
            shape = replace(MODELS[name], checkpointing="full", bytes_per_value=2 if precision == "bf16" else 4)
            model = parallelize(build_gpt(shape, 4096), Regime("fsdp", precision, "full"), cpu)
            docs = [np.random.default_rng(0).integers(0, shape.vocab, size=1025)]
            with FsdpUnsharded() as meter, FsdpTraffic() as traffic:
                group_pass(model, pool, Assignment(0, GroupShape(1, world), (0,), 0, 0), docs, "torch", cpu).backward()
            got = torch.tensor([float(meter.params_peak), float(meter.params_and_grads_peak), float(traffic.all_gather),
                                float(traffic.reduce_scatter)], dtype=torch.float64)  # fmt: skip
            dist.all_reduce(got, op=dist.ReduceOp.MAX)
            cluster = Cluster(name="cpu", nodes=1, gpus_per_node=world, fsdp_prefetch_layers=0)
            cost = CostModel(cluster, shape)
            pred, moved = cost.fsdp_unsharded_bytes(), cost.fsdp_collective_bytes()
            rows.append({"case": f"fsdp/{name}/P{world}/{precision}", "model": name, "world": world,
                         "precision": precision, "fsdp_params_peak_measured": int(got[0]),
                         "fsdp_params_peak_predicted": int(pred["params"]),
                         "fsdp_params_grads_peak_measured": int(got[1]),
                         "fsdp_params_grads_peak_predicted": int(pred["params"] + pred["grads"]),
                         "fsdp_reduce_scatter_predicted": int(pred["reduce_scatter"]),
                         "fsdp_all_gather_bytes_measured": int(got[2]),
                         "fsdp_all_gather_bytes_predicted": int(moved["all_gather"]),
                         "fsdp_reduce_scatter_bytes_measured": int(got[3]),
                         "fsdp_reduce_scatter_bytes_predicted": int(moved["reduce_scatter"])})  # fmt: skip
            del model
    return rows


def run_fsdp(worlds: list[int], models: list[str], precisions: list[str]) -> list[dict]:
    from sp.spawn import run_distributed

    return [row for w in worlds for row in run_distributed(_fsdp_worker, w, models, precisions, timeout=1800)[0]]
