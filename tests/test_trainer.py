"""Trainer on 4 gloo ranks vs an independent single-process loop on the same batches; resume; TensorBoard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.dist import run_distributed

STRATEGIES = ["ulysses", "ring", "hybrid", "adaptive"]
STEPS = 3


def _job(out, strategy="adaptive", steps=STEPS, use_milp=True, checkpoint_every=0, resume=False):
    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from trainer.config import DataConfig, TrainConfig
    from trainer.loop import TrainJob

    return TrainJob(
        model=ModelShape(name="tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
                         checkpointing="none", bytes_per_value=4),
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=4, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0),
        planner=PlannerConfig(use_milp=use_milp),
        data=DataConfig(max_len=768, tokens_per_step=3000, seed=1),
        train=TrainConfig(steps=steps, strategy=strategy, out_dir=out, progress=False, warmup_steps=1,
                          checkpoint_every=checkpoint_every, resume=resume, picture_every=2),
    )  # fmt: skip


def _params(model):
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()
    }


def _distributed(rank, world, tmp):
    from trainer.loop import Trainer

    out = {}
    for s in STRATEGIES:
        tr = Trainer(_job(f"{tmp}/{s}", s))
        out[s] = (tr.run(), _params(tr.model) if rank == 0 else None)
    # resume: 2 steps + checkpoint, then a new trainer continues to 4; against 4 uninterrupted steps
    full = Trainer(_job(f"{tmp}/full", "adaptive", 4, use_milp=False)).run()
    Trainer(_job(f"{tmp}/resumed", "adaptive", 2, use_milp=False, checkpoint_every=2)).run()
    tail = Trainer(_job(f"{tmp}/resumed", "adaptive", 4, use_milp=False, checkpoint_every=2, resume=True)).run()
    out["resume"] = (full, tail)
    return out


def _reference(rank, world):
    """Plain loop: one document at a time on one process, same model init, data order, schedule, AdamW."""
    from megatron.core import parallel_state

    import sp
    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt
    from trainer.data import Corpus, StepLoader
    from trainer.loop import lr_at

    job = _job("/nonexistent")
    parallel_state.initialize_model_parallel(1, 1)
    model = build_gpt(job.model, job.data.max_len, seed=job.train.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=job.train.lr, weight_decay=job.train.weight_decay)
    loader = StepLoader(Corpus(job.data), job.data)
    pool = sp.GroupPool()
    losses = []
    for step in range(STEPS):
        docs = loader.next_step()
        n_tok = sum(len(d) - 1 for d in docs)
        total = 0.0
        for d in docs:
            ctx = pool.context((0,), 1, 1, [0, len(d) - 1], check=False)
            x = torch.from_numpy(d[:-1])[None]
            y = torch.from_numpy(d[1:])[None]
            loss = model(
                x, None, None, labels=y, packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx)
            ).sum()
            (loss / n_tok).backward()
            total += loss.item()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, job.train)
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(total / n_tok)
    return losses, _params(model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("train"))
    ref = run_distributed(_reference, 1, timeout=180)[0]
    dist = run_distributed(_distributed, 4, tmp, timeout=420)
    return tmp, ref, dist


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_single_process(runs, strategy):
    _, (ref_losses, ref_params), dist = runs
    losses, params = dist[0][strategy]
    assert all(math.isfinite(x) for x in losses)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    for rank in range(4):  # every rank trained the same model
        np.testing.assert_allclose(dist[rank][strategy][0], losses, rtol=0, atol=1e-12)
    worst = max((params[k] - ref_params[k]).abs().max().item() for k in ref_params)
    assert worst <= 1e-5, f"parameters differ by {worst:.2e}"


def test_resume_gives_the_same_losses(runs):
    _, _, dist = runs
    full, tail = dist[0]["resume"]
    assert tail == full[2:], f"resumed {tail} vs uninterrupted {full[2:]}"


def test_tensorboard_has_the_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, _ = runs
    acc = EventAccumulator(f"{tmp}/adaptive/tb")
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/tokens_per_s", "time/step_measured_s", "time/step_predicted_s",
                "planner/solve_s", "planner/gap", "plan/groups", "plan/load_imbalance", "memory/peak_gib",
                "plan/strategy_ulysses"]:  # fmt: skip
        assert tag in tags, f"missing scalar {tag}"
    assert len(acc.Scalars("train/loss")) == STEPS
    assert "plan/gantt" in acc.Tags()["images"]
