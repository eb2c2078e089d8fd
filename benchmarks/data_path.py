"""The throughput cost of the data path: ``make train``'s configuration (4 CPU ranks under torchrun, the tiny
GPT, the adaptive planner, validation every 20 steps) run under code trees, one after another in one
invocation on one machine.

Rows: each ``--tree`` (e.g. a ``git worktree`` of the commit before the mixtures) with the arguments it was
given, and this tree with ``make train``'s single-source and mixture data. Reported per row: steps per
second over the training steps after ``--warmup`` (each step's own time from the per-step log line, the
evaluation excluded), the wall time to the first step (start-up: imports, corpus scan, model build), and the
whole run's wall time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

STEP = re.compile(r"\[sp-train\] step (\d+)/\d+ loss \S+ .* (\d+\.\d+) s \(planned")
EVAL = ("eval.every=20", "eval.holdout=0.005", "eval.max_docs=16")


def _one(label: str, tree: str, args: list[str], steps: int, warmup: int, workdir: Path) -> dict:
    out = workdir / label
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "SP_SIGNAL"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": tree}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m", "cli.train",
           *args, f"train.steps={steps}", f"train.out_dir={out}", "train.progress=false", "train.resume=false",
           "train.checkpoint_every=0"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, times = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        m = STEP.search(line)
        if m:
            first = first if first is not None else time.perf_counter() - t0
            times.append(float(m.group(2)))
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0 or len(times) != steps:
        raise RuntimeError(f"{label}: rc {rc}, {len(times)} of {steps} step lines ({' '.join(cmd)})")
    timed = times[warmup:]
    return {"bench": "data_path", "row": label, "tree": tree, "args": args, "steps": steps, "warmup": warmup,
            "steps_per_s": len(timed) / sum(timed), "step_s_median": sorted(timed)[len(timed) // 2],
            "startup_s": first - times[0] if first is not None else None, "wall_s": wall}  # fmt: skip


def run(trees: list[str], steps: int, warmup: int, workdir: str) -> list[dict]:
    """``trees``: ``LABEL=PATH`` entries run with make train's old arguments (single stdlib source); this tree
    is run as ``after-stdlib`` (data=stdlib) and ``after-mix`` (data=mix, make train's default now)."""
    here = str(Path(__file__).resolve().parents[1])
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in trees:
        label, _, path = entry.partition("=")
        rows.append(_one(label, str(Path(path).resolve()), list(EVAL), steps, warmup, work))
    rows.append(_one("after-stdlib", here, ["data=stdlib", *EVAL], steps, warmup, work))
    rows.append(_one("after-mix", here, ["data=mix", *EVAL], steps, warmup, work))
    return rows
