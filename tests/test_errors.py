"""One message per error: after the ranks connect, a rank other than 0 stays silent when rank 0 reports the same
error, and speaks (naming itself) when its error is its own or rank 0 reports none; through torchrun, a data
error found on both ranks is printed once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr

from tests.dist import run_distributed


def _report_worker(rank, world):
    import torch.distributed as dist

    from cli import errors

    errors.WAIT_S = 1.0  # rank 0 never posts in the first case: rank 1 waits this long, then speaks
    out = []
    for case in ("rank 1 alone", "the same", "their own"):
        buf = io.StringIO()
        msg = {"the same": "bad data", "their own": f"bad rank {rank}"}.get(case, "bad rank 1")
        with redirect_stderr(buf):
            if not (case == "rank 1 alone" and rank == 0):
                errors.report("sp-train", ValueError(msg), rank)
        dist.barrier()
        out.append(buf.getvalue())
    return out


def test_each_error_is_printed_once_for_the_job():
    r0, r1 = run_distributed(_report_worker, 2, timeout=120)
    assert r0 == ["", "sp-train: error: bad data\n", "sp-train: error: bad rank 0\n"]
    assert r1 == ["sp-train: error (rank 1): bad rank 1\n", "", "sp-train: error (rank 1): bad rank 1\n"]


def test_a_data_error_on_every_rank_prints_once_through_torchrun(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no completion here"}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "SP_SIGNAL"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli.train",
           f"train.out_dir={tmp_path / 'run'}", "data.source=jsonl", f"data.path={bad}", "train.steps=1"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert out.returncode != 0
    assert out.stderr.count("sp-train: error") == 1, out.stderr[-3000:]
    assert "a prompt row needs" in out.stderr or "'completion'" in out.stderr, out.stderr[-3000:]
