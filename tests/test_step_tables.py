"""No host sync in a layer: under FSDP2 with a bf16 parameter dtype (whose forward-input cast rebuilds every
dataclass it meets), every layer of a micro-step sees the same SP context, its device tables are built once,
and the host-to-device uploads per micro-step do not grow with the number of layers (counted on the one
upload helper, :func:`sp.step_tables.upload`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed

LAYERS = (2, 4)


def _job(out, layers, checkpointing):
    from planner.planner import PlannerConfig
    from planner.types import Cluster, ModelShape
    from trainer.config import DataConfig, TrainConfig
    from trainer.loop import TrainJob

    shape = ModelShape(name="tiny", layers=layers, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
                       checkpointing=checkpointing, bytes_per_value=2)  # fmt: skip
    return TrainJob(
        model=shape,
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=2, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0),
        planner=PlannerConfig(use_milp=False),
        data=DataConfig(max_len=512, tokens_per_step=1024, seed=1),
        train=TrainConfig(steps=1, strategy="adaptive", out_dir=out, progress=False, checkpoint_every=0, resume=False,
                          picture_every=0, precision="bf16"),
    )  # fmt: skip


def _worker(rank, world, tmp):
    import sp
    from planner.types import Assignment, GroupShape, MicroStep, StepPlan
    from sp.step_tables import UPLOADS, StepTables
    from trainer.loop import Trainer
    from trainer.step import run_plan

    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (n + 1,), generator=gen).numpy() for n in (300, 200, 96)]
    shapes = [GroupShape(2, 1), GroupShape(1, 2), GroupShape(2, 1)]  # Ulysses, ring, Ulysses
    micro = tuple(MicroStep((Assignment(0, s, (i,), 0.0, 0.0),), 0.0) for i, s in enumerate(shapes))
    plan = StepPlan(tuple(len(d) - 1 for d in docs), micro, 0.0, "hand")
    from models.attention import SPCoreAttention

    seen: list[list[object]] = []
    params: list[list[object]] = []  # the objects themselves: a freed one's id can be reused
    builds = [0]
    inner, build, core = sp.attention, StepTables._build, SPCoreAttention.forward

    def core_spy(self, *args, packed_seq_params=None, **kw):
        params[-1].append(packed_seq_params)
        return core(self, *args, packed_seq_params=packed_seq_params, **kw)

    def spy(q, k, v, ctx):
        if not seen or ctx.__class__ is not sp.SPContext:
            raise AssertionError(f"unexpected context {ctx!r}")
        seen[-1].append(ctx)
        return inner(q, k, v, ctx)

    def counting(self):
        builds[0] += 1
        return build(self)

    sp.attention, StepTables._build, SPCoreAttention.forward = spy, counting, core_spy
    out = {}
    try:
        for mode in ("none", "full"):
            for layers in LAYERS:
                tr = Trainer(_job(f"{tmp}/{mode}-{layers}", layers, mode))
                per_micro = []
                for m in micro:
                    one = StepPlan(plan.lengths, (m,), 0.0, "hand")
                    seen.append([])
                    params.append([])
                    b0, u0 = builds[0], UPLOADS.calls
                    run_plan(tr.model, tr.pool, one, docs, rank, None, kernel=tr.kernel.name)
                    per_micro.append(
                        (
                            len(seen[-1]),
                            len({id(c) for c in seen[-1]}),
                            builds[0] - b0,
                            len({id(p) for p in params[-1]}),
                            UPLOADS.calls - u0,
                        )
                    )
                out[(mode, layers)] = per_micro
    finally:
        sp.attention, StepTables._build, SPCoreAttention.forward = inner, build, core
    return out


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("tables")), timeout=600)


def test_every_layer_sees_one_context_built_once_per_micro_step(counted):
    for rank, res in enumerate(counted):
        for (mode, layers), per_micro in res.items():
            for calls, distinct, builds, rebuilt, _ in per_micro:
                assert calls >= layers and distinct == 1 and builds == 1, (rank, mode, layers, per_micro)
                assert rebuilt > 1, "FSDP2's input cast rebuilt the packed-sequence dataclass per unit (the hazard)"


def test_uploads_per_micro_step_do_not_grow_with_layers(counted):
    for rank, res in enumerate(counted):
        for mode in ("none", "full"):
            few, many = (tuple(u for *_, u in res[(mode, n)]) for n in LAYERS)
            assert few == many, (rank, mode, few, many)
            assert max(many) <= 4, many  # tokens + labels, weights, the index tables, RoPE's inverse frequencies


def test_the_context_is_not_a_dataclass():
    """FSDP2's ``_apply_to_tensors`` rebuilds dataclasses with ``dataclasses.replace`` (its caches lost)."""
    import sp

    ctx = sp.SPContext(sp.GroupLayout.build([0, 8], 1, 1), 0)
    assert not dataclasses.is_dataclass(ctx) and not dataclasses.is_dataclass(ctx.tables)
