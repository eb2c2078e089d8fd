"""Chunked linear cross-entropy, tiled MLP and activation offload: exact against the plain paths (fp32,
1e-6) in one process and through the real trainer (FSDP2, 4 ranks) under every strategy; offloaded bytes
equal the formula; the planner picks offload only for the micro-step that needs it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed

STRATEGIES = ["ulysses", "ring", "hybrid", "adaptive"]
ALL_ON = {"loss_chunk_tokens": 64, "tile_tokens": 100, "checkpointing": "offload"}
REPLICATE = {"sharding": "replicate"}  # GradSync's bucketed all-reduce, launched from post-accumulate hooks


def _shape(**kw):
    from planner.types import ModelShape

    return ModelShape(
        **{
            "name": "tiny",
            "layers": 2,
            "hidden": 64,
            "heads": 4,
            "kv_heads": 2,
            "head_dim": 16,
            "ffn": 128,
            "vocab": 256,
            "checkpointing": "full",
            "bytes_per_value": 4,
            **kw,
        }
    )


def _single(shape, doc):
    import sp
    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt

    model = build_gpt(shape, 1024, seed=3)
    ctx = sp.GroupPool().context((0,), 1, 1, [0, len(doc) - 1], check=False)
    out = model(doc[None, :-1], None, None, labels=doc[None, 1:],
                packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx))  # fmt: skip
    out.sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _single_worker(rank, world):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    doc = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(0))
    out = {}
    for tied in (False, True):
        for base, cases in (({}, ({"loss_chunk_tokens": 64}, {"loss_chunk_tokens": 1000}, {"tile_tokens": 100},
                                  {"loss_chunk_tokens": 50, "tile_tokens": 128})),
                            ({"qk_norm": True}, ({"tile_tokens": 96},))):  # fmt: skip
            ref = _single(_shape(tie_embeddings=tied, **base), doc)
            for kw in cases:
                got = _single(_shape(tie_embeddings=tied, **base, **kw), doc)
                loss = float((got[0] - ref[0]).abs().max())
                grad = max(float((got[1][n] - g).abs().max() / g.abs().max()) for n, g in ref[1].items())
                out[(tied, tuple({**base, **kw}.items()))] = (loss, grad)
    return out


def test_chunked_loss_and_tiling_equal_the_plain_path():
    (res,) = run_distributed(_single_worker, 1, timeout=300)
    for case, (loss, grad) in res.items():
        assert loss < 1e-6 and grad < 1e-6, (case, loss, grad)


def _job(out, strategy, sharding="fsdp", state_offload="off", **model):
    from planner.planner import PlannerConfig
    from planner.types import Cluster
    from trainer.config import DataConfig, TrainConfig
    from trainer.loop import TrainJob

    return TrainJob(
        model=_shape(**model),
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=4, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0),
        planner=PlannerConfig(use_milp=False, state_offload=state_offload),
        data=DataConfig(max_len=768, tokens_per_step=3000, seed=1),
        train=TrainConfig(steps=2, strategy=strategy, out_dir=out, progress=False, warmup_steps=1,
                          checkpoint_every=0, resume=False, picture_every=0, precision="fp32",
                          sharding=sharding),
    )  # fmt: skip


def _trainer_worker(rank, world, tmp):
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # every warning the runs below emit, each time
        warnings.simplefilter("always")
        out = _trainer_runs(rank, world, tmp)
    out["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return out


def _trainer_runs(rank, world, tmp):
    from sp.layout import GroupLayout
    from trainer.loop import Trainer
    from trainer.sharding import checkpoint_switch, full_state
    from trainer.step import my_group, run_plan

    out = {}
    for s in STRATEGIES:
        runs = {}
        for name, kw in (
            ("plain", {}),
            ("all_on", ALL_ON),
            ("replicate_offload", REPLICATE | {"checkpointing": "offload"}),
            ("replicate_tiled", REPLICATE | {"tile_tokens": 64}),
            ("replicate_all_on", REPLICATE | ALL_ON),
            ("states_on_host", {"state_offload": "on"} | ALL_ON),
        ):
            tr = Trainer(_job(f"{tmp}/{s}-{name}", s, **kw))
            runs[name] = (tr.run(), full_state(tr.model))
            if name == "states_on_host":
                out.setdefault("host_states", []).append(_host_states(tr))
        out[s] = runs
    # offloaded bytes of one step: every layer's input, on the host, per micro-step's local rows
    tr = Trainer(_job(f"{tmp}/count", "adaptive", **ALL_ON))
    docs = tr.loader.next_step()
    plan = tr._plan([len(d) - 1 for d in docs])
    switch = checkpoint_switch(tr.model)
    expected = 0
    for micro in plan.micro_steps:
        g = my_group(micro.groups, rank)
        if g is not None and g.seqs:
            cu = [0]
            for i in g.seqs:
                cu.append(cu[-1] + len(docs[i]) - 1)
            rows = GroupLayout.build(cu, g.shape.ulysses, g.shape.ring).local_tokens
        else:
            rows = 1  # the empty pass's dummy token
        expected += tr.job.model.layers * rows * tr.job.model.hidden * 4
    switch.offload.reset()
    run_plan(tr.model, tr.pool, plan, docs, rank, None)
    out["offload"] = (switch.offload.bytes, expected, switch.offload._live)
    out["modes"] = _modes_per_micro_step(rank, tmp)
    return out


def _host_states(tr):
    """Under state offload: whether FSDP2 keeps every parameter shard on the host (its CPUOffloadPolicy), and
    this rank's measured state bytes (parameters, gradients, AdamW moments) vs the cost model's host bytes."""
    from torch.distributed.fsdp import FSDPModule

    from trainer.memory import state_bytes

    flags = [p.offload_to_cpu for m in tr.model.modules() if isinstance(m, FSDPModule)
             for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params]  # fmt: skip
    got = state_bytes(tr.model, tr.optim)  # after the step: gradients freed (zero_grad), parameters and moments
    host = tr.cost.host_state_gib() * 2**30 * 12 / 16  # 16 bytes per element with the fp32 gradient, 12 without
    return all(flags) and bool(flags), got["params"] + got["optim"], host, tr.cost.states_gib()


MODES = [
    ("full", 0, 0),
    ("none", 64, 0),
    ("none", 0, 40),
    ("offload", 64, 40),
    ("full", 0, 0, 1),
    ("none", 0, 0, 1),
]  # tiles < local tokens; head chunks 2 (the default) or 1 (u=2 receives 2 kv heads)


def _modes_per_micro_step(rank, tmp):
    """A hand-made plan whose micro-steps switch checkpointing, the loss chunk and the sequence tile (one document
    each, u=2 x r=2 on all ranks), on a model built with the planner's choices: the saved bytes of each
    follow its mode's formula (so each switch took effect) and the gradients equal a plain single-process
    model's."""
    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt
    from planner.types import Assignment, GroupShape, MemoryMode, MicroStep, StepPlan
    from trainer.loop import Trainer
    from trainer.step import run_plan

    job = _job(f"{tmp}/modes", "adaptive", kv_heads=4)
    job = dataclasses.replace(job, planner=dataclasses.replace(job.planner, checkpointing=("full", "none", "offload"),
                              loss_chunk_tokens=(0, 64), tile_tokens=(0, 40)))  # fmt: skip
    tr = Trainer(job)
    gen = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 256, (n + 1,), generator=gen).numpy() for n in (256, 128, 320, 200, 64, 96)]
    g = lambda i: (Assignment(0, GroupShape(2, 2), (i,), 0.0, 0.0),)  # noqa: E731
    micro = tuple(MicroStep(g(i), 0.0, MemoryMode(*m)) for i, m in enumerate(MODES))
    plan = StepPlan(tuple(len(d) - 1 for d in docs), micro, 0.0, "hand")
    stats = run_plan(tr.model, tr.pool, plan, docs, rank, None, count_saved=True)
    predicted = [
        tr.cost.with_mode(MemoryMode(*m)).saved_bytes_per_token(2) * n / 4 for m, n in zip(MODES, plan.lengths)
    ]
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor() for n, p in tr.model.named_parameters()}
    if rank:
        return None
    ref = build_gpt(tr.job.model, tr.job.data.max_len, seed=tr.job.train.seed)
    for d in docs:
        ctx = tr.pool.context((0,), 1, 1, [0, len(d) - 1], check=False)
        x, y = torch.from_numpy(d[:-1])[None], torch.from_numpy(d[1:])[None]
        loss = ref(x, None, None, labels=y, packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx)).sum()
        (loss / sum(plan.lengths)).backward()
    diff = max(float((grads[n] - p.grad).abs().max() / p.grad.abs().max()) for n, p in ref.named_parameters())
    return diff, list(stats.saved_bytes), predicted


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_distributed(_trainer_worker, 4, str(tmp_path_factory.mktemp("mem")), timeout=900)


def test_all_techniques_on_equal_the_plain_trainer_under_every_strategy(trained):
    """FSDP and replicated training (whose gradient all-reduce starts from post-accumulate hooks: the offloaded
    layer and the tiled MLP must accumulate each gradient once per backward) equal FSDP's plain path."""
    runs = trained[0]
    for s in STRATEGIES:
        l0, p0 = runs[s]["plain"]
        for name in ("all_on", "replicate_offload", "replicate_tiled", "replicate_all_on", "states_on_host"):
            l1, p1 = runs[s][name]
            assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-6, (s, name, l0, l1)
            assert max(float((p0[k] - p1[k]).abs().max()) for k in p0) < 1e-6, (s, name)


def test_states_on_host_are_fsdp2_offloaded_and_counted(trained):
    """planner.state_offload=on: every FSDP2 parameter is offloaded (CPUOffloadPolicy), the states' bytes
    measured after training equal the cost model's host bytes (rank 0 holds the most), and none are counted
    on the GPU."""
    for rank, part in enumerate(trained):
        for offloaded, measured, host, gpu in part["host_states"]:
            assert offloaded and gpu == 0.0, (rank, offloaded, gpu)
            assert measured <= host and (rank or measured == host), (rank, measured, host)


def test_training_warns_of_nothing_of_ours(trained):
    """No FSDP2 view-output alarm (the model returns its loss with its own storage: models.gpt) and no
    FutureWarning, through every strategy, memory technique and FSDP2/replicated run above. The libraries' own
    DeprecationWarnings (megatron-core, torch.jit), hidden by Python's default filters, are not ours."""
    for rank, part in enumerate(trained):
        ours = [w for w in part["warnings"] if "view tensor" in w or w.startswith("FutureWarning")]
        assert not ours and part["warnings"], (rank, ours)  # recorded (the libraries' notices), none of ours


def test_offloaded_bytes_are_every_layer_input(trained):
    for rank, part in enumerate(trained):
        got, want, live = part["offload"]
        assert got == want and live == 0, (rank, got, want, live)  # all fetched back by the end of backward


def test_memory_modes_switch_per_micro_step_exactly(trained):
    diff, measured, predicted = trained[0]["modes"]
    assert diff < 1e-6, diff
    assert measured == pytest.approx(predicted, rel=1e-9), (measured, predicted)
    assert len(set(measured)) >= 4  # the modes differ: every switch changed what the micro-step kept


def test_planner_offloads_only_the_micro_step_that_needs_it():
    """Two micro-steps: a long sequence that fits one GPU only with its layer inputs on the host, and short
    ones that fit under full checkpointing; offload costs host transfer time, so only the first uses it."""
    from planner.cost import CostModel
    from planner.planner import Planner, PlannerConfig
    from planner.types import Cluster

    shape = dataclasses.replace(_shape(), layers=32, hidden=1024, heads=8, kv_heads=8, head_dim=128, ffn=2816,
                                vocab=1024, bytes_per_value=2)  # fmt: skip
    cluster = Cluster(name="two", nodes=1, gpus_per_node=2, peak_tflops=100.0, mfu=0.5, memory_gib=6.0,
                      intra_gbs=100.0, inter_gbs=100.0, host_gbps=10.0, beta_ms=50.0)  # fmt: skip
    cost = CostModel(cluster, shape)
    full, off = cost.with_checkpointing("full"), cost.with_checkpointing("offload")
    long = int(0.9 * off.tokens_capacity(2))
    assert full.tokens_capacity(2) < long  # the long sequence needs offload on the whole cluster
    shorts = [int(full.tokens_capacity(1) * 0.4)] * 4
    plan = Planner(cost, PlannerConfig(checkpointing=("full", "offload"))).plan([long, *shorts])
    modes = {m.checkpointing for m in plan.micro_steps}
    where = {m.checkpointing: {s for g in m.groups for s in g.seqs} for m in plan.micro_steps}
    assert modes == {"full", "offload"}, plan
    assert 0 in where["offload"] and not where["full"] & {0}, where


@pytest.mark.parametrize("technique", ["loss_chunk_tokens", "tile_tokens"])
def test_planner_chunks_or_tiles_only_the_micro_step_that_needs_it(technique):
    """The loss chunk and the sequence tile as per-micro-step choices: a long sequence that fits the cluster only
    with the technique (a large vocabulary's logits, a wide MLP's recompute), short ones that fit without.
    The technique costs compute, so only the long sequence's micro-step uses it; a batch that fits without
    it is planned exactly as without the choice (no slower than the model's own setting)."""
    from planner.cost import CostModel
    from planner.planner import Planner, PlannerConfig
    from planner.types import Cluster, GroupShape, MemoryMode

    shape = dataclasses.replace(_shape(), layers=4, hidden=1024, heads=8, kv_heads=8, head_dim=128,
                                ffn=16384 if technique == "tile_tokens" else 2816,
                                vocab=128256 if technique == "loss_chunk_tokens" else 1024,
                                bytes_per_value=2)  # fmt: skip
    cluster = Cluster(name="two", nodes=1, gpus_per_node=2, peak_tflops=100.0, mfu=0.5, memory_gib=8.0,
                      intra_gbs=100.0, inter_gbs=100.0, beta_ms=50.0)  # fmt: skip
    cost = CostModel(cluster, shape)
    on = cost.with_mode(dataclasses.replace(MemoryMode.of(shape), **{technique: 2048}))
    pair = [GroupShape(1, 2), GroupShape(2, 1)]  # capacities are per layout: the roomiest one of both GPUs
    long = int(0.99 * max(on.tokens_capacity(2, s) for s in pair))  # no room left beside it for a short sequence
    assert max(cost.tokens_capacity(2, s) for s in pair) < long  # it needs the technique on the whole cluster
    shorts = [int(cost.tokens_capacity(1) * 0.4)] * 4
    config = PlannerConfig(**{technique: (0, 2048)})
    plan = Planner(cost, config).plan([long, *shorts])
    used = {s: getattr(m.mode(shape), technique) for m in plan.micro_steps for g in m.groups for s in g.seqs}
    assert used[0] == 2048 and all(used[s] == 0 for s in range(1, 5)), used
    plain = Planner(cost, PlannerConfig()).plan(shorts)
    chosen = Planner(cost, config).plan(shorts)
    assert {getattr(m.mode(shape), technique) for m in chosen.micro_steps} == {0}
    assert chosen.time_s == pytest.approx(plain.time_s, rel=1e-9)


def test_fsdp_unsharded_parameters_and_gradients_equal_the_formula():
    """FSDP2's unsharded parameters (root + the current layer) and, before each reduce-scatter, the layer's
    unsharded gradients, measured by hooking FSDP2's unshard/reshard/post-backward, in fp32 and bf16; the bytes
    its all-gathers and reduce-scatters move in one forward + backward."""
    from benchmarks.memory import run_fsdp

    rows = run_fsdp([2], ["tiny"], ["fp32", "bf16"])
    assert len(rows) == 2
    for r in rows:
        assert r["fsdp_params_peak_measured"] == r["fsdp_params_peak_predicted"], r
        assert r["fsdp_params_grads_peak_measured"] == r["fsdp_params_grads_peak_predicted"], r
        for kind in ("all_gather", "reduce_scatter"):  # one micro-step's collectives (FSDP's time in the planner)
            assert r[f"fsdp_{kind}_bytes_measured"] == r[f"fsdp_{kind}_bytes_predicted"], r


def _no_labels_worker(rank, world):
    from megatron.core import parallel_state

    import sp
    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt

    parallel_state.initialize_model_parallel(1, 1)
    model = build_gpt(_shape(loss_chunk_tokens=64), 128)
    ctx = sp.GroupPool().context((0,), 1, 1, [0, 9], check=False)
    try:
        model(torch.zeros(1, 9, dtype=torch.long), None, None, packed_seq_params=SPPackedSeqParams(qkv_format="sbhd",
              sp_ctx=ctx))  # fmt: skip
    except ValueError as e:
        return str(e)
    return "no error"


def test_chunked_loss_model_refuses_a_call_without_labels():
    (msg,) = run_distributed(_no_labels_worker, 1, timeout=120)
    assert "loss_chunk_tokens=64" in msg and "pass labels" in msg


def _qk_norm_worker(rank, world):
    """Bytes saved for backward by a model with Qwen3's q/k norms, per checkpointing mode and precision."""
    import numpy as np
    from megatron.core import parallel_state

    from models.gpt import build_gpt
    from planner.cost import CostModel
    from planner.types import Assignment, Cluster, GroupShape
    from sp.groups import GroupPool
    from trainer.memory import SavedBytes
    from trainer.sharding import Regime, parallelize
    from trainer.step import group_pass

    parallel_state.initialize_model_parallel(1, 1)
    pool, out = GroupPool(), []
    docs = [np.random.default_rng(0).integers(0, 256, size=257)]
    for precision, b in (("fp32", 4), ("bf16", 2)):
        for ckpt, tile in (("none", 0), ("selective", 0), ("full", 0), ("none", 64), ("selective", 64), ("full", 64)):
            shape = _shape(qk_norm=True, head_dim=32, checkpointing=ckpt, bytes_per_value=b, tile_tokens=tile)
            model = parallelize(build_gpt(shape, 512), Regime("fsdp", precision, ckpt), torch.device("cpu"))
            with SavedBytes(model) as meter:
                group_pass(model, pool, Assignment(0, GroupShape(1, 1), (0,), 0, 0), docs, "cpu_fused",
                           torch.device("cpu"), meter=meter)  # fmt: skip
            out.append((precision, ckpt, tile, meter.bytes,
                        CostModel(Cluster(name="cpu"), shape).saved_bytes_per_token() * 256))  # fmt: skip
    return out


def test_qk_norm_saved_bytes_equal_the_model():
    (rows,) = run_distributed(_qk_norm_worker, 1, timeout=300)
    for precision, ckpt, tile, measured, predicted in rows:
        assert measured == predicted, (precision, ckpt, tile, measured, predicted)


def _saved_in_backward(shape, precision="fp32"):
    """Bytes of the storages a 256-token pass of ``shape`` (1 rank, FSDP2) saves in backward that its forward
    did not save: the recomputes' own, not the slices of the layer inputs and attention outputs kept."""
    import numpy as np

    from models.gpt import build_gpt
    from planner.types import Assignment, GroupShape
    from sp.groups import GroupPool
    from trainer.memory import SavedBytes
    from trainer.sharding import Regime, checkpoint_switch, parallelize
    from trainer.step import group_pass

    docs = [np.random.default_rng(0).integers(0, 256, size=257)]
    model = parallelize(build_gpt(shape, 512), Regime("fsdp", precision, shape.checkpointing), torch.device("cpu"))
    switch = checkpoint_switch(model)
    if switch is not None:
        switch.offload.reset()
    with SavedBytes(model) as meter:
        loss = group_pass(model, GroupPool(), Assignment(0, GroupShape(1, 1), (0,), 0, 0), docs, "cpu_fused",
                          torch.device("cpu"), meter=meter)  # fmt: skip
        with SavedBytes(seen_by=meter) as back:
            loss.backward()
    return back.bytes


def _tile_worker(rank, world):
    """What the tiles' recomputes save in backward over a 256-token pass in 4 tiles of 64, with and without q/k
    norms, fp32 and bf16."""
    from megatron.core import parallel_state

    from planner.cost import CostModel
    from planner.types import Cluster

    parallel_state.initialize_model_parallel(1, 1)
    out = []
    for precision, b in (("fp32", 4), ("bf16", 2)):
        for qk in (False, True):
            shape = _shape(qk_norm=qk, head_dim=32, checkpointing="none", bytes_per_value=b, tile_tokens=64)
            parts = CostModel(Cluster(name="cpu"), shape).tile_part_bytes()
            out.append((precision, qk, _saved_in_backward(shape, precision),
                        shape.layers * 256 * (parts["before"] + parts["after"])))  # fmt: skip
    return out


def test_tiles_save_what_the_memory_model_counts():
    (rows,) = run_distributed(_tile_worker, 1, timeout=300)
    for precision, qk, measured, predicted in rows:
        assert measured == predicted, (precision, qk, measured, predicted)


def _recompute_worker(rank, world):
    """What the recomputed layers save in backward under activation offload: each layer fetches its input from
    the host and recomputes, so every layer's recompute shows, with and without sequence tiles and q/k norms."""
    from megatron.core import parallel_state

    from planner.cost import CostModel
    from planner.types import Cluster

    parallel_state.initialize_model_parallel(1, 1)
    out = []
    for kw in ({}, {"tile_tokens": 64}, {"qk_norm": True, "head_dim": 32, "tile_tokens": 64}):
        shape = _shape(checkpointing="offload", **kw)
        cost = CostModel(Cluster(name="cpu"), shape)
        tiles = sum(cost.tile_part_bytes()[k] for k in ("before", "after")) if shape.tile_tokens else 0
        out.append((kw, _saved_in_backward(shape), shape.layers * 256 * (cost._layer_bytes(1, "none", False) + tiles)))
    return out


def test_recomputed_layers_save_what_the_memory_model_counts():
    """The recomputed layer's working set (``CostModel._layer_bytes(u, "none")``, the fetched input among it)
    measured layer by layer in backward; the tiles' parts on top where the layer is tiled."""
    (rows,) = run_distributed(_recompute_worker, 1, timeout=300)
    for kw, measured, predicted in rows:
        assert measured == predicted, (kw, measured, predicted)
