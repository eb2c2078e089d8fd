"""Online calibration (planner.fit, planner.calibration, trainer.calibrate).

The synthetic clusters time every plan through the cost model's own public terms (``seq_time_s``,
``group_overhead_s``, ``attention_s``, ``a2a_s``, ``ring_exposed_s``) of a *true* model, independently of the
fit's vectorised predictor; the fit starts from the YAML's constants and must learn the truth.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from planner import calibration
from planner.cost import CostModel
from planner.fit import GroupTiming, MicroTiming, StepTiming, fit, slowed, step_errors
from planner.planner import Planner, PlannerConfig
from planner.types import Cluster, ModelShape
from tests.test_planner import fsdp_exposed

MODEL = ModelShape(name="m", layers=4, hidden=512, heads=8, kv_heads=8, ffn=1024, vocab=1000, checkpointing="full")
# peak 20: the attention times of peak 10 under the old half count (the standard count doubled the FLOPs), so
# that ring transfers are not hidden entirely behind attention and a ring slowdown shows in them
YAML = Cluster(name="y", nodes=1, gpus_per_node=8, peak_tflops=20, mfu=1.0, memory_gib=4.0, intra_gbs=5.0,
               inter_gbs=1.0, beta_ms=5.0)  # fmt: skip
# a cap only: the greedy search ends far sooner. Power-of-two groups: the fits below learn one bandwidth per ring
# degree from 16 steps, and with every group size the same steps spread over twice as many degrees
PLAN = PlannerConfig(time_limit_s=10.0, use_milp=False, group_sizes="powers_of_two")


def timing(truth: CostModel, step: int, plan, rng: np.random.Generator | None = None, noise: float = 0.0):
    """What a run on the ``truth`` cluster measures for ``plan`` (relative noise ``noise``)."""

    def jitter(t: float) -> float:
        return t * (1 + noise * rng.standard_normal()) if rng is not None else t

    micro = []
    for m in plan.micro_steps:
        c = truth.for_micro(m)
        groups, totals = [], []
        for g in m.groups:
            if not g.seqs:
                continue
            n = np.array([plan.lengths[s] for s in g.seqs], dtype=np.float64)
            attn = np.sum(c.attention_s(n, g.shape.size) + c.a2a_s(n, g.shape) + c.ring_exposed_s(n, g.shape))
            attn += c.group_overhead_s(g.shape) - c.beta_s  # the collectives' latency
            groups.append(GroupTiming(g.shape, tuple(int(x) for x in n), jitter(float(attn))))
            totals.append(float(np.sum(c.seq_time_s(n, g.shape))) + c.group_overhead_s(g.shape))
        micro.append(MicroTiming(tuple(groups), jitter(max(totals) + fsdp_exposed(truth, max(totals))), m.memory))
    return StepTiming(step, tuple(micro), sum(x.time_s for x in micro) + truth.step_overhead_s)


def batches(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(x) + 64 for x in np.minimum(rng.lognormal(8.5, 1.2, size=24), 60000)] for _ in range(n)]


def window(truth: CostModel, start: CostModel, n: int = 16, noise: float = 0.03, seed: int = 0) -> list[StepTiming]:
    """``n`` steps planned with ``start`` (as a run plans before its first fit), timed on ``truth``."""
    rng = np.random.default_rng(seed + 1)
    return [timing(truth, i, Planner(start, PLAN).plan(b), rng, noise) for i, b in enumerate(batches(n, seed))]


def strategies(plan) -> set[str]:
    return {g.shape.strategy for m in plan.micro_steps for g in m.groups if g.seqs}


def test_learns_a_slow_ring_and_changes_the_plan():
    """A cluster whose ring transfers are 3x slower than the YAML says, with only 30% of each step hidden, plus
    lower compute efficiency and a per-step overhead: learned from 16 noisy steps."""
    yaml = CostModel(YAML, MODEL)
    truth = CostModel(replace(YAML, p2p_gbs={2: 5 / 3, 4: 5 / 3, 8: 5 / 3}, ring_overlap=0.3, mfu=0.7, beta_ms=12,
                              step_ms=30), MODEL)  # fmt: skip
    res = fit(yaml, window(truth, yaml))
    assert res.accepted, res.reason
    assert res.error_before["median"] > 0.3 and res.error_after["median"] < 0.05
    cl = res.cost.cluster
    for r in (2, 4, 8):
        assert cl.p2p_gbs[r] == pytest.approx(5 / 3, rel=0.15)
    assert cl.ring_overlap == pytest.approx(0.3, abs=0.1)
    assert cl.alpha1_ms == pytest.approx(yaml.fitted_form().cluster.alpha1_ms / 0.7, rel=0.1)  # mfu 0.7
    # a batch where the YAML's plan uses ring groups: the fitted model avoids them, and on the true cluster its
    # plan is faster
    batch = batches(1, seed=7)[0]
    before, after = Planner(yaml, PLAN).plan(batch), Planner(res.cost, PLAN).plan(batch)
    assert strategies(before) & {"ring", "hybrid"}
    assert not strategies(after) & {"ring", "hybrid"}
    assert timing(truth, 0, after).time_s < 0.8 * timing(truth, 0, before).time_s


def test_injected_ring_slowdown_is_learned():
    """SP_CALIBRATION_SLOWDOWN's transform: the YAML is right except that ring attention runs 3x slower."""
    yaml = CostModel(YAML, MODEL)
    steps = [slowed(t, "ring", 3.0) for t in window(yaml, yaml, noise=0.0)]
    assert step_errors(yaml, steps).max() > 0.1
    res = fit(yaml, steps)
    assert res.accepted, res.reason
    assert res.error_after["median"] < 0.5 * res.error_before["median"]
    batch = batches(1, seed=7)[0]
    assert strategies(Planner(yaml, PLAN).plan(batch)) & {"ring"}
    assert "ring" not in strategies(Planner(res.cost, PLAN).plan(batch))


def test_a_constant_that_starts_at_zero_is_learned():
    """An offline fit that clipped alpha2 to 0 (sp-bench e2e's did): the per-token compute is learned anyway."""
    yaml = CostModel(YAML, MODEL)
    a1, a2 = yaml.fitted_form().cluster.alpha1_ms, yaml.fitted_form().cluster.alpha2_ms
    start = CostModel(replace(YAML, alpha1_ms=a1, alpha2_ms=0.0), MODEL)
    res = fit(start, window(yaml, start, noise=0.01))
    assert res.accepted, res.reason
    assert res.cost.cluster.alpha2_ms == pytest.approx(a2, rel=0.2)


def test_fitted_constants_predict_what_the_fit_predicted():
    """The fitted cost model (used by the planner) and the fit's own predictor agree, step by step: the
    factors were turned into exactly those constants."""
    yaml = CostModel(YAML, MODEL)
    truth = CostModel(replace(YAML, p2p_gbs={4: 1.0}, a2a_gbs={2: 2.0}, ring_overlap=0.5, mfu=0.5), MODEL)
    steps = window(truth, yaml, noise=0.05)
    res = fit(yaml, steps)
    assert res.accepted, res.reason
    planned = [Planner(res.cost, PLAN).plan(b) for b in batches(3, seed=3)]
    for p in planned:  # the model's own plan time + step overhead = a re-timing through the public terms
        t = timing(res.cost, 0, p)
        assert t.time_s == pytest.approx(p.time_s + res.cost.step_overhead_s, rel=1e-6)
    assert step_errors(res.cost, [timing(res.cost, 0, p) for p in planned]).max() < 1e-9


def test_too_few_or_degenerate_samples_keep_the_constants():
    yaml = CostModel(YAML, MODEL)
    steps = window(yaml, yaml, n=4)
    res = fit(yaml, steps)
    assert not res.accepted and "too few steps" in res.reason and res.cost is yaml
    # every step the same single sequence on one GPU, measured as zero-length work: nothing moves
    plan = Planner(yaml, PLAN).plan([1000])
    flat = [StepTiming(i, tuple(MicroTiming(tuple(replace(g, attention_s=0.0) for g in m.groups), 1.0)
                                for m in timing(yaml, i, plan).micro), 1.0) for i in range(12)]  # fmt: skip
    res = fit(yaml, flat)
    assert not res.accepted and "degenerate window" in res.reason and res.cost is yaml


def test_a_fit_worse_on_held_out_steps_is_rejected():
    """Fit on steps from a slow cluster, hold out steps the current model predicts exactly: rejected."""
    yaml = CostModel(YAML, MODEL)
    slow = CostModel(replace(YAML, mfu=0.3, step_ms=50), MODEL)
    steps = window(slow, yaml, n=12) + [
        replace(t, step=100 + t.step) for t in window(yaml, yaml, n=4, noise=0.0, seed=5)
    ]
    res = fit(yaml, steps)
    assert not res.accepted and "would not beat" in res.reason
    assert res.cost is yaml and res.error_before["median"] < 1e-9


def test_calibration_file_round_trips(tmp_path):
    from planner.fit import constants

    yaml = CostModel(YAML, MODEL)
    truth = CostModel(replace(YAML, p2p_gbs={4: 1.0}, ring_overlap=0.4, mfu=0.6, step_ms=20), MODEL)
    res = fit(yaml, window(truth, yaml))
    assert res.accepted, res.reason
    path = tmp_path / "calibration.json"
    calibration.write(path, constants(res.cost), MODEL, {"device": "cpu", "world": 8}, fitted_at_step=16)
    loaded = CostModel(calibration.calibrated(replace(YAML, calibration=str(path)), MODEL), MODEL)
    for b in batches(3, seed=4):
        assert Planner(loaded, PLAN).plan(b).time_s == pytest.approx(Planner(res.cost, PLAN).plan(b).time_s, rel=1e-9)
    assert loaded.step_overhead_s == pytest.approx(res.cost.step_overhead_s)
    # another checkpointing mode is rescaled as with_checkpointing does
    sel = replace(MODEL, checkpointing="selective")
    other = CostModel(calibration.calibrated(replace(YAML, calibration=str(path)), sel), sel)
    assert other.compute_s(4096.0, 2) == pytest.approx(res.cost.with_checkpointing("selective").compute_s(4096.0, 2))
    assert "measured on cpu x 8" in calibration.describe(str(path))


def test_bad_calibration_files_are_clear_errors(tmp_path):
    from planner.fit import constants

    path = tmp_path / "c.json"
    good = {"format": 1, "constants": constants(CostModel(YAML, MODEL)), "model": calibration.model_identity(MODEL),
            "hardware": {"device": "cpu"}}  # fmt: skip

    def load(doc, model=MODEL) -> str:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(ValueError) as e:
            calibration.calibrated(replace(YAML, calibration=str(path)), model)
        return str(e.value)

    with pytest.raises(ValueError, match="no such file"):
        calibration.calibrated(replace(YAML, calibration=str(tmp_path / "none.json")), MODEL)
    assert "not JSON" in load("{")
    assert "missing fields ['hardware']" in load({k: v for k, v in good.items() if k != "hardware"})
    c = dict(good["constants"])
    del c["step_ms"]
    assert "constants miss ['step_ms']" in load({**good, "constants": c})
    assert "p2p_gbs[4]=-1.0" in load({**good, "constants": {**good["constants"], "p2p_gbs": {"4": -1.0}}})
    assert "alpha1_ms=-0.1" in load({**good, "constants": {**good["constants"], "alpha1_ms": -0.1}})
    assert "ring_overlap=1.5" in load({**good, "constants": {**good["constants"], "ring_overlap": 1.5}})
    msg = load(good, replace(MODEL, hidden=1024))
    assert "another model" in msg and "hidden: 512 (file) vs 1024" in msg
    assert "bytes_per_value: 2 (file) vs 4" in load(good, replace(MODEL, bytes_per_value=4))
    assert "format 7" in load({**good, "format": 7})
    # every malformed field is named with the file, never a traceback from deep inside (issue 35's probes)
    consts = good["constants"]
    for doc, field in (({**good, "constants": {**consts, "alpha1_ms": 1e300}}, "constants.alpha1_ms=1e+300"),
                       ({**good, "constants": {**consts, "ring_overlap": "0.5"}}, "constants.ring_overlap='0.5'"),
                       ({**good, "constants": {**consts, "a2a_gbs": [1.0]}}, "constants.a2a_gbs=[1.0]"),
                       ({**good, "constants": {**consts, "p2p_gbs": {"4": 1e9}}}, "constants.p2p_gbs[4]=1000000000.0"),
                       ({**good, "constants": {**consts, "p2p_gbs": {"two": 1.0}}}, "group size 'two'"),
                       ({**good, "model": {**good["model"], "checkpointing": "bogus"}}, "model.checkpointing='bogus'"),
                       ({"two": 1}, "missing fields ['format', 'constants', 'model', 'hardware']"),
                       ([1, 2], "a JSON object is expected"),
                       ({**good, "constants": {**consts, "alpha1_ms": consts["alpha1_ms"] * 1e5}},
                        "constants.alpha1_ms=")):  # fmt: skip
        msg = load(doc)
        assert str(path) in msg and field in msg, (field, msg)
    assert "more than 1000x from what the FLOPs model gives" in load(
        {**good, "constants": {**consts, "alpha1_ms": consts["alpha1_ms"] * 1e5}}
    )


# ---- in the trainer: 4 gloo ranks, real measured steps ----


def _runs(rank, world, tmp):
    from tests.test_trainer import _job
    from trainer.loop import Trainer

    def job(out, steps, recalibrate_every, recalibrate_window=30, calibration=None, resume=False):
        j = _job(out, "adaptive", steps, resume=resume)
        return replace(j, planner=replace(j.planner, recalibrate_every=recalibrate_every,
                                          recalibrate_window=recalibrate_window),
                       cluster=replace(j.cluster, calibration=calibration),
                       train=replace(j.train, memory_every=0, picture_every=0))  # fmt: skip

    out = {}
    a = Trainer(job(f"{tmp}/a", 12, recalibrate_every=4, recalibrate_window=8))
    a.run()
    if rank == 0:
        out["history"] = [(r.accepted, r.reason, r.fit_steps, r.held_out_steps) for r in a.calibrator.history]
        out["a"] = a.cost.cluster
    file = f"{tmp}/a/calibration.json"
    b = Trainer(job(f"{tmp}/b", 2, recalibrate_every=0, calibration=file))
    b.run()
    c = Trainer(job(f"{tmp}/a", 13, recalibrate_every=0, resume=True))  # continues from its own last fit
    c.run()
    if rank == 0:
        out["b"], out["c"] = b.cost.cluster, c.cost.cluster
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.dist import run_distributed

    tmp = tmp_path_factory.mktemp("calib")
    return tmp, run_distributed(_runs, 4, str(tmp), timeout=600)[0]


def test_the_trainer_recalibrates_and_plans_with_the_fit(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, out = trained
    hist = out["history"]
    assert len(hist) == 3  # a fit every 4 steps
    for i, h in enumerate(hist):
        assert not h[3] or h[3][-1] == 4 * (i + 1) - 1  # the held-out steps are the window's last
    accepted = [i for i, h in enumerate(hist) if h[0]]
    assert accepted, f"no fit accepted: {hist}"
    for h in hist:
        assert h[0] or h[1]  # a rejection always says why
    doc = calibration.read(f"{tmp}/a/calibration.json")
    assert doc["hardware"]["world"] == 4 and doc["model"]["layers"] == 2
    assert doc["constants"]["alpha1_ms"] == pytest.approx(out["a"].alpha1_ms)
    acc = EventAccumulator(f"{tmp}/a/tb")
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("time/step_predicted_s", "time/step_measured_s", "calib/step_error", "calib/step_error_median10",
                "calib/alpha1_ms", "calib/beta_ms", "calib/step_ms", "calib/fit_accepted", "time/attention_s",
                "time/comm_wait_s"):  # fmt: skip
        assert tag in tags, f"missing scalar {tag}"
    errors = [e.value for e in acc.Scalars("calib/step_error")]
    first = 4 * (accepted[0] + 1)  # the fit after step `first`; plans from step first + 2 on use it (0-based)
    assert len(errors) == 12
    if first + 2 < 12:
        assert np.median(errors[first + 2 :]) < 0.5 * np.median(errors[:first]), errors
    # attention was measured: positive on every step, and below the step time
    attn = [e.value for e in acc.Scalars("time/attention_s")]
    steps = [e.value for e in acc.Scalars("time/step_measured_s")]
    assert all(0 < a < s for a, s in zip(attn, steps))
    waits = [e.value for e in acc.Scalars("time/comm_wait_s")]
    assert all(0 <= w <= a for w, a in zip(waits, attn))  # blocked on transfers: a part of attention


def test_a_run_starts_from_a_calibration_file_and_a_resumed_run_from_its_own(trained):
    tmp, out = trained
    c = calibration.read(f"{tmp}/a/calibration.json")["constants"]
    for run in ("b", "c"):
        cl = out[run]
        assert (cl.alpha1_ms, cl.alpha2_ms, cl.beta_ms, cl.step_ms, cl.ring_overlap) == pytest.approx(
            (c["alpha1_ms"], c["alpha2_ms"], c["beta_ms"], c["step_ms"], c["ring_overlap"])
        )
        assert {k: v for k, v in cl.p2p_gbs.items() if str(k) in map(str, c["p2p_gbs"])} == pytest.approx(
            {int(k): v for k, v in c["p2p_gbs"].items()}
        )


def test_sp_plan_reads_the_calibration(trained, tmp_path):
    import subprocess
    import sys

    tmp, _ = trained
    args = ["cluster=cpu", "model=tiny", "model.layers=2", "model.hidden=64", "model.heads=4", "model.kv_heads=2",
            "model.head_dim=16", "model.ffn=128", "model.vocab=256", "model.bytes_per_value=4",
            "lengths.fixed=[700,300,2000]", "output.format=json", "output.baselines=false"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "cli.plan", *args, f"cluster.calibration={tmp}/a/calibration.json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "measured on cpu" in result["calibration"]
    bad = subprocess.run([sys.executable, "-m", "cli.plan", *args[:-3], "model.hidden=128", *args[-3:],
                          f"cluster.calibration={tmp}/a/calibration.json"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert bad.returncode != 0 and "another model" in bad.stderr and "hidden: 64 (file) vs 128" in bad.stderr
