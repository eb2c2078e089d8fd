"""Trainer on 4 gloo ranks (FSDP2 ZeRO-3, full activation checkpointing, fp32) vs an independent
single-process loop on the same batches; replicate; idle ranks; bf16 vs fp32; resume; TensorBoard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.dist import run_distributed

STRATEGIES = ["ulysses", "ring", "hybrid", "adaptive"]
STEPS = 3


def _job(out, strategy="adaptive", steps=STEPS, use_milp=True, checkpoint_every=0, resume=False,
         sharding="fsdp", precision="fp32", checkpointing="full", choices=()):  # fmt: skip
    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from trainer.config import DataConfig, TrainConfig
    from trainer.loop import TrainJob

    return TrainJob(
        model=ModelShape(name="tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
                         checkpointing=checkpointing, bytes_per_value=4),
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=4, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0),
        planner=PlannerConfig(use_milp=use_milp, checkpointing=choices),
        data=DataConfig(max_len=768, tokens_per_step=3000, seed=1),
        train=TrainConfig(steps=steps, strategy=strategy, out_dir=out, progress=False, warmup_steps=1,
                          checkpoint_every=checkpoint_every, resume=resume, picture_every=2, sharding=sharding,
                          precision=precision, memory_every=1),
    )  # fmt: skip


def _params(model):
    from trainer.sharding import full_state

    return full_state(model)  # collective under FSDP; rank 0 gets the tensors


def _distributed(rank, world, tmp):
    from trainer.loop import Trainer

    out = {}
    for s in STRATEGIES:
        tr = Trainer(_job(f"{tmp}/{s}", s))
        out[s] = (tr.run(), _params(tr.model))
    tr = Trainer(_job(f"{tmp}/replicate", "adaptive", sharding="replicate", checkpointing="selective"))
    out["replicate"] = (tr.run(), _params(tr.model))
    out["idle"] = _idle_ranks(rank, tmp)
    out["modes"] = _checkpointing_per_micro_step(rank, tmp)
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
    from trainer.data.corpus import Corpus
    from trainer.data.mixture import Mixture
    from trainer.loop import lr_at

    job = _job("/nonexistent")
    parallel_state.initialize_model_parallel(1, 1)
    model = build_gpt(job.model, job.data.max_len, seed=job.train.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=job.train.lr, weight_decay=job.train.weight_decay)
    loader = Mixture([Corpus(s) for s in job.data.mixture()], job.data)
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


def _idle_ranks(rank, tmp):
    """A hand-made plan that leaves ranks idle (micro-step 1: ranks 2, 3; micro-step 2: ranks 0-2): under
    FSDP they run empty passes. Gradients vs a plain single-process model, one document at a time."""
    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt
    from planner.types import Assignment, GroupShape, MicroStep, StepPlan
    from trainer.loop import Trainer
    from trainer.step import run_plan

    tr = Trainer(_job(f"{tmp}/idle", "adaptive"))
    docs = tr.loader.next_step()[:3]
    assert len(docs) == 3
    a = lambda first, u, r, seqs: Assignment(first, GroupShape(u, r), seqs, 0.0, 0.0)  # noqa: E731
    plan = StepPlan(
        tuple(len(d) - 1 for d in docs),
        (
            MicroStep((a(0, 2, 2, (0,)),), 0.0),
            MicroStep((a(0, 1, 2, (1,)),), 0.0),
            MicroStep((a(3, 1, 1, (2,)),), 0.0),
        ),
        0.0,
        "hand",
    )
    run_plan(tr.model, tr.pool, plan, docs, rank, None)
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor() for n, p in tr.model.named_parameters()}
    if rank:
        return None
    ref = build_gpt(tr.job.model, tr.job.data.max_len, seed=tr.job.train.seed)
    n_tok = sum(len(d) - 1 for d in docs)
    for d in docs:
        ctx = tr.pool.context((0,), 1, 1, [0, len(d) - 1], check=False)
        x, y = torch.from_numpy(d[:-1])[None], torch.from_numpy(d[1:])[None]
        loss = ref(x, None, None, labels=y, packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx)).sum()
        (loss / n_tok).backward()
    return max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())


def _checkpointing_per_micro_step(rank, tmp):
    """A plan whose three micro-steps run full, selective and no checkpointing (one document each, u=2 x r=2
    on all ranks): the saved bytes of each follow that mode's formula, and the gradients are exact."""
    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt
    from planner.types import Assignment, GroupShape, MemoryMode, MicroStep, StepPlan
    from trainer.loop import Trainer
    from trainer.step import run_plan

    tr = Trainer(_job(f"{tmp}/modes", "adaptive", checkpointing="full", choices=("full", "selective", "none")))
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 256, size=n + 1).astype(np.int64) for n in (256, 128, 64)]  # multiples of 2ru = 8
    modes = ("full", "selective", "none")
    g = lambda i: (Assignment(0, GroupShape(2, 2), (i,), 0.0, 0.0),)  # noqa: E731
    micro = tuple(MicroStep(g(i), 0.0, MemoryMode(m)) for i, m in enumerate(modes))
    plan = StepPlan((256, 128, 64), micro, 0.0, "hand")
    stats = run_plan(tr.model, tr.pool, plan, docs, rank, None, count_saved=True)
    predicted = [tr.cost.with_checkpointing(m).saved_bytes_per_token(2) * n / 4 for m, n in zip(modes, plan.lengths)]
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor() for n, p in tr.model.named_parameters()}
    if rank:
        return None
    ref = build_gpt(tr.job.model, tr.job.data.max_len, seed=tr.job.train.seed)
    n_tok = sum(plan.lengths)
    for d in docs:
        ctx = tr.pool.context((0,), 1, 1, [0, len(d) - 1], check=False)
        x, y = torch.from_numpy(d[:-1])[None], torch.from_numpy(d[1:])[None]
        loss = ref(x, None, None, labels=y, packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx)).sum()
        (loss / n_tok).backward()
    diff = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
    return diff, stats.saved_bytes, predicted


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("train"))
    ref = run_distributed(_reference, 1, timeout=180)[0]
    dist = run_distributed(_distributed, 4, tmp, timeout=600)
    return tmp, ref, dist


@pytest.mark.parametrize("strategy", [*STRATEGIES, "replicate"])
def test_matches_single_process(runs, strategy):
    """fp32 + fsdp + full checkpointing (replicate + selective for "replicate") equals the plain loop."""
    _, (ref_losses, ref_params), dist = runs
    losses, params = dist[0][strategy]
    assert all(math.isfinite(x) for x in losses)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    for rank in range(4):  # every rank trained the same model
        np.testing.assert_allclose(dist[rank][strategy][0], losses, rtol=0, atol=1e-12)
    worst = max((params[k] - ref_params[k]).abs().max().item() for k in ref_params)
    assert worst <= 1e-5, f"parameters differ by {worst:.2e}"


def test_idle_ranks_run_empty_passes_with_exact_gradients(runs):
    _, _, dist = runs
    assert dist[0]["idle"] <= 1e-6, f"gradients differ by {dist[0]['idle']:.2e}"


def test_plan_chooses_checkpointing_per_micro_step(runs):
    """The trainer honours each micro-step's checkpointing: bytes saved for backward follow that mode's
    formula (full < selective < none), gradients stay exact."""
    _, _, dist = runs
    diff, measured, predicted = dist[0]["modes"]
    assert diff <= 1e-6, f"gradients differ by {diff:.2e}"
    assert measured == [int(p) for p in predicted], (measured, predicted)
    per_token = [m / n for m, n in zip(measured, (256, 128, 64))]
    assert per_token[0] < per_token[1] < per_token[2]


def _bf16_runs(rank, world, tmp):
    from trainer.loop import Trainer

    return {p: Trainer(_job(f"{tmp}/{p}40", "adaptive", 40, use_milp=False, precision=p)).run()
            for p in ("fp32", "bf16")}  # fmt: skip


@pytest.mark.slow  # 2 x 40 steps on 4 ranks
def test_bf16_ends_within_two_percent_of_fp32(tmp_path):
    runs = run_distributed(_bf16_runs, 4, str(tmp_path), timeout=900)
    fp32, bf16 = runs[0]["fp32"], runs[0]["bf16"]
    assert len(fp32) == len(bf16) == 40 and all(math.isfinite(x) for x in bf16)
    assert abs(bf16[-1] - fp32[-1]) <= 0.02 * fp32[-1], f"bf16 {bf16[-1]:.4f} vs fp32 {fp32[-1]:.4f}"
    assert fp32[-1] < fp32[0] - 0.5  # it trained


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
                "plan/strategy_ulysses", "memory/states_gib", "memory/states_predicted_gib",
                "memory/saved_for_backward_gib_max", "memory/saved_for_backward_predicted_gib_max",
                "planner/late_plans", "train/tokens_per_s_per_gpu", "train/tokens_trained", "perf/mfu_measured",
                "perf/mfu_predicted"]:  # fmt: skip
        assert tag in tags, f"missing scalar {tag}"
    assert len(acc.Scalars("train/loss")) == STEPS
    assert "plan/gantt" in acc.Tags()["images"]
