"""sp-profile measures this machine and writes a cluster profile the planner accepts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from planner.cost import CostModel
from planner.planner import Planner
from planner.types import Cluster, ModelShape


@pytest.mark.slow  # sp-profile measures on 4 ranks
def test_profile_writes_a_usable_cluster(tmp_path):
    out = tmp_path / "cpu.yaml"
    args = ["--world", "2", "--mbytes", "1", "--out", str(out), "--model", "tiny", "--act-tokens", "512"]
    res = subprocess.run([sys.executable, "-m", "cli.profile", *args], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    assert measured["peak_tflops"] > 0 and measured["a2a_gbs"]["2"] > 0 and measured["p2p_gbs"]["2"] > 0
    body = yaml.safe_load(out.read_text())
    assert body.pop("defaults") == ["cluster_schema"]
    cluster = Cluster(**body)
    assert cluster.world == 2 and cluster.a2a_gbs[2] > 0
    # tiny, no checkpointing, fp32: the saved bytes per token are the cost model's (sp-bench memory checks it),
    # plus the transient working set
    tiny = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
                      checkpointing="none", bytes_per_value=4)  # fmt: skip
    cost = CostModel(Cluster(nodes=1, gpus_per_node=1), tiny)
    assert cluster.act_bytes_per_token == cost.saved_bytes_per_token() + max(
        cost.working_bytes_per_token(u, 2) for u in tiny.ulysses_degrees(64)
    )
    plan = Planner(CostModel(cluster, ModelShape(layers=2, hidden=64, heads=4))).plan([100, 2000, 30])
    assert plan.time_s > 0
