"""Issue 13: a HiGHS model whose presolve loops forever (ignoring time_limit) cannot hang the planner."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPS = Path(os.environ.get("SP_SHARED_DIR", REPO.parent / "shared")) / "data" / "highs" / "presolve-loop.mps"
needs_mps = pytest.mark.skipif(not MPS.exists(), reason=f"{MPS} not found (set SP_SHARED_DIR)")


def _lp():
    import highspy

    from planner.milp import _quiet_stdout

    with _quiet_stdout():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.readModel(str(MPS))
    return h.getLp()


@needs_mps
def test_presolve_loop_model_solves_within_a_second():
    from planner.milp import INFEASIBLE, solve_lp

    t0 = time.perf_counter()
    sol = solve_lp(_lp(), 0.03)
    assert time.perf_counter() - t0 < 1.0
    assert sol is not None and sol is not INFEASIBLE and len(sol) == _lp().num_col_


@needs_mps
def test_watchdog_abandons_a_solve_that_ignores_its_time_limit():
    """With presolve forced on, HiGHS loops; the watchdog returns None within the limit plus its grace and
    warns. A subprocess, so the abandoned solver thread dies with it instead of spinning in pytest."""
    code = f"""
import logging, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
sys.path.insert(0, {str(REPO)!r})
from tests.test_highs_watchdog import _lp
from planner.milp import solve_lp, WATCHDOG_GRACE_S
lp = _lp()
t0 = time.perf_counter()
sol = solve_lp(lp, 0.03, presolve="on")
print("RESULT", sol is None, time.perf_counter() - t0 < 0.03 + WATCHDOG_GRACE_S + 0.5)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "RESULT True True" in out.stdout, out.stdout + out.stderr
    assert "solve abandoned" in out.stderr
