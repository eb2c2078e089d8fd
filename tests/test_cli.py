"""sp-plan end to end: clean JSON on stdout, the summary keys, the picture, and clear config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "lengths" / "wikipedia.txt.gz"


def _plan(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cli.plan", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=180)  # fmt: skip


def test_json_summary_and_picture(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("\n".join(str(n) for n in [70000, 30000, 9000, 4000, 1200, 800, 500, 300] * 8))
    pic = tmp_path / "gantt.png"
    out = _plan("cluster=a100x64_flexsp", "model=gpt-7b", f"lengths.path={lengths}", "lengths.global_batch=64",
                "lengths.steps=2", "output.format=json", f"output.picture={pic}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)  # stdout is exactly one JSON object (no solver banner)
    s = result["summary"]
    for key in ("planned_step_s", "lower_bound_s", "gap", "solve_s_p50", "solve_s_max", "baselines",
                "speedup_vs_static", "speedup_vs_oracle_static", "peak_memory_gib", "memory_gib"):  # fmt: skip
        assert key in s
    assert s["lower_bound_s"] <= s["planned_step_s"]
    assert set(s["baselines"]) >= {"static", "oracle_static", "static_ulysses", "static_ring", "static_hybrid",
                                   "ulysses_hetero", "greedy"}  # fmt: skip
    assert s["baselines"]["oracle_static"] <= s["baselines"]["static"]
    assert pic.stat().st_size > 10_000 and pic.read_bytes()[:4] == b"\x89PNG"


def test_picture_bands_are_to_scale():
    """Each group's band covers its ranks' rows but for a fixed gap: a 64-GPU group reaches row 63.9 (at 0.92 of
    its height it ended at row 59, as if 5 GPUs were idle), and neighbours never overlap."""
    from planner.picture import band

    top, h = band(0, 64)
    assert top < 0.1 and top + h > 63.9
    for size in (1, 3, 8):
        a, b = band(0, size), band(size, size)
        assert a[0] + a[1] < b[0] and b[0] - (a[0] + a[1]) < 0.1


def test_million_tokens_on_h100(tmp_path):
    out = _plan("cluster=h100x64", "model=llama3-8b", "lengths.fixed=[1048576]", "output.format=json",
                "output.baselines=false", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)["summary"]
    assert s["peak_memory_gib"] <= 76.0


def test_config_errors_are_clear(tmp_path):
    out = _plan("cluster.no_such_key=1", cwd=tmp_path)
    assert out.returncode != 0 and "no_such_key" in out.stderr
    out = _plan("cluster=nosuch", cwd=tmp_path)
    assert out.returncode != 0 and "a100x64_flexsp" in out.stderr  # lists the valid options
    out = _plan("lengths.fixed=[100,0]", cwd=tmp_path)
    assert out.returncode == 2 and ">= 1" in out.stderr
    out = _plan("lengths.fixed=[100000000]", "model=gpt-7b", cwd=tmp_path)
    assert out.returncode == 2 and "exceeds what the cluster can hold" in out.stderr


def test_unknown_keys_name_the_closest_once(tmp_path):
    """A misspelt key or option: one error from rank 0 naming the closest valid ones, exit 2, and silence on the
    other ranks (every rank of a launch checks; only rank 0 speaks); schema groups are not options."""
    import os

    def train(*args, rank="0"):
        env = {**os.environ, "RANK": rank}
        return subprocess.run([sys.executable, "-m", "cli.train", "--check", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env=env)  # fmt: skip

    out = train("train.step=10")
    assert out.returncode == 2 and "unknown config key 'train.step' (did you mean 'train.steps'?)" in out.stderr
    assert out.stderr.count("error") == 1 and "append" not in out.stderr  # not Hydra's "+train.step" advice
    quiet = train("train.step=10", rank="3")
    assert quiet.returncode == 2 and quiet.stderr == ""
    assert "(did you mean 'model.hidden'?)" in train("model.hidn=3").stderr
    assert "(did you mean 'mix'?)" in train("data=mixx").stderr
    assert train("data=mix", "train.steps=3", "model.rope_scaling={rope_type: linear, factor: 2.0}").returncode == 0
    for run in (lambda: train("cluster=cluster_schema"), lambda: _plan("cluster=cluster_schema", cwd=tmp_path)):
        out = run()
        assert out.returncode == 2 and "cluster=cluster_schema is not a cluster config" in out.stderr, out.stderr


def test_help_cfg_and_info_alone(tmp_path):
    out = _plan("--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("sp-plan: dry-run planner")
    assert "powered by Hydra" not in out.stdout and "data:" not in out.stdout  # sp-plan takes no data group
    assert "cluster: a100x64_flexsp, cpu, h100x64" in out.stdout and "schema" not in out.stdout
    out = _plan("--cfg", cwd=tmp_path)
    assert out.returncode == 0 and "lengths:" in out.stdout, out.stderr[-500:]
    out = _plan("--info", cwd=tmp_path)
    assert out.returncode == 0 and "Hydra" in out.stdout, out.stderr[-500:]
    train = subprocess.run([sys.executable, "-m", "cli.train", "--help"], capture_output=True, text=True, timeout=120)
    assert train.returncode == 0 and train.stdout.startswith("sp-train: train") and "data: " in train.stdout


def test_single_process_port_is_free_and_on_loopback():
    from trainer.bootstrap import free_loopback_port, read_env

    env = read_env({})
    assert env.launcher == "single" and env.master_addr == "127.0.0.1" and env.master_port != 29500
    assert free_loopback_port() > 0


def test_length_schedule_reports_each_phase(tmp_path):
    """sp-plan takes sp-train's data.max_len_schedule: each phase plans pieces split at its own limit."""
    from planner.lengths import split_lengths

    assert split_lengths([10, 25, 3], 10).tolist() == [10, 10, 10, 5, 3]  # 25 = 10 + 10 + 5, as sp-train splits
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("\n".join(str(n) for n in [70000, 30000, 9000, 4000, 1200, 800, 500, 300] * 8))
    out = _plan("cluster=a100x64_flexsp", "model=gpt-7b", f"lengths.path={lengths}", "lengths.global_batch=64",
                "lengths.steps=1", "output.format=json", "output.baselines=false",
                "lengths.max_len_schedule=[[0,8192],[500,65536]]", f"output.picture={tmp_path}/plan.png",
                cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    for i in (1, 2):  # one Gantt chart per phase
        assert (tmp_path / f"plan_phase{i}.png").read_bytes()[:4] == b"\x89PNG"
    phases = json.loads(out.stdout)["phases"]
    assert [(p["from_step"], p["to_step"], p["max_len"]) for p in phases] == [(0, 500, 8192), (500, None, 65536)]
    assert phases[0]["summary"]["planned_step_s"] < phases[1]["summary"]["planned_step_s"]  # 64 pieces of <= 8K
    bad = _plan(f"lengths.path={lengths}", "lengths.max_len_schedule=[[5,8192]]", cwd=tmp_path)
    assert bad.returncode == 2 and "the first at step 0" in bad.stderr


def test_closing_lines_name_every_artefact(tmp_path):
    from cli.train import artefacts

    for f in ("tb/events.1", "checkpoints/step_000010/x", "checkpoints/step_000020/x", "eval/needle_step_000010.png",
              "eval/needle_step_000020.png", "eval/needle_step_000020.json", "eval/loss_by_position_step_000020.png",
              "plans/plan_step_000005.png", "calibration.json"):  # fmt: skip
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    text = "\n".join(artefacts(tmp_path))
    for want in ("tensorboard --logdir", "newest step_000020", "needle_step_000020.png (and 1 earlier)",
                 "needle_step_000020.json", "loss_by_position_step_000020.png", "plan_step_000005.png",
                 "calibration.json"):  # fmt: skip
        assert want in text, (want, text)


def test_help_texts_name_the_real_flags():
    """Every ``--flag`` a tool's help text mentions is one of its options (the description once named --corpus)."""
    import argparse
    import contextlib
    import re

    from benchmarks import tiny_llama

    captured: dict = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):  # the parser as built, without running the tool
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab  # type: ignore[method-assign]
    try:
        with contextlib.suppress(SystemExit):
            tiny_llama.main([])
    finally:
        argparse.ArgumentParser.parse_args = real  # type: ignore[method-assign]
    parser = captured["parser"]
    named = set(re.findall(r"(--[a-z][a-z-]+)", parser.format_help()))
    valid = {o for a in parser._actions for o in a.option_strings}
    assert named <= valid, named - valid


def test_config_reference_is_the_schemas():
    """docs/config.md lists every key with its type, default and meaning, generated from the schema: a key added,
    removed, retyped or given another default without regenerating it fails here."""
    from cli.config_reference import render

    committed = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert committed == render(), "regenerate: python -m cli.config_reference > docs/config.md"
    rows = [line for line in committed.splitlines() if line.startswith("| `")]
    assert len(rows) > 120 and not [r for r in rows if r.endswith("|  |")], "every key has a meaning"
