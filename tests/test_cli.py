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
