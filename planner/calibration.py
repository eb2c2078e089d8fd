"""Calibration files: the time constants a run fitted (:mod:`planner.fit`), carried to sp-plan and sp-train.

``calibration.json`` in a run folder holds the constants, the model they were measured with, the hardware,
the fit's window and its held-out error before and after. ``cluster.calibration=FILE`` makes both CLIs start
from it: its constants replace the cluster YAML's (``alpha1_ms``, ``alpha2_ms``, ``beta_ms``, ``step_ms``,
``ring_overlap``, the latencies, and the all-to-all / ring bandwidths of the group sizes it measured; sizes it
never ran keep the YAML's ``a2a_gbs`` / ``p2p_gbs`` / ``intra_gbs`` / ``inter_gbs``). The constants belong to a
model: a file measured with another architecture, precision or causality is refused; another checkpointing
mode is rescaled as :meth:`planner.cost.CostModel.with_checkpointing` does.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from planner.cost import RECOMPUTE
from planner.types import Cluster, ModelShape

FORMAT = 1
MODEL_KEYS = ("layers", "hidden", "heads", "n_kv_heads", "d_head", "d_ffn", "vocab", "swiglu", "bytes_per_value")
CONSTANT_KEYS = ("alpha1_ms", "alpha2_ms", "beta_ms", "step_ms", "a2a_gbs", "p2p_gbs", "ring_overlap",
                 "intra_latency_us", "inter_latency_us")  # fmt: skip


def model_identity(model: ModelShape, causal: bool = True) -> dict[str, Any]:
    return {"name": model.name, **{k: getattr(model, k) for k in MODEL_KEYS}, "checkpointing": model.checkpointing,
            "causal": causal}  # fmt: skip


def write(path: str | Path, constants: dict[str, Any], model: ModelShape, hardware: dict[str, Any],
          **extra: Any) -> None:  # fmt: skip
    """Write a calibration file atomically (``extra``: the window, the errors, the step)."""
    doc = {"format": FORMAT, "constants": constants, "model": model_identity(model), "hardware": hardware, **extra}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read(path: str | Path) -> dict[str, Any]:
    """A calibration file, checked: every field present, bandwidths and constants physical."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cluster.calibration={str(path)!r}: no such file (a run folder's calibration.json)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cluster.calibration={str(path)!r} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"calibration {path}: a JSON object is expected, got {type(doc).__name__}")
    if doc.get("kind") == KERNELS:
        return _read_kernels(doc, path)
    missing = [k for k in ("format", "constants", "model", "hardware") if k not in doc]
    if missing:
        raise ValueError(f"calibration {path}: missing fields {missing} (has {sorted(doc)}; a run folder's "
                         "calibration.json, or sp-bench gpu's kernels.json)")  # fmt: skip
    if doc["format"] != FORMAT:
        raise ValueError(f"calibration {path}: format {doc['format']!r}; this version reads format {FORMAT}")
    for part in ("constants", "model", "hardware"):
        if not isinstance(doc[part], dict):
            raise ValueError(f"calibration {path}: {part}={doc[part]!r}; valid: a JSON object")
    c = doc["constants"]
    missing = [k for k in CONSTANT_KEYS if k not in c]
    if missing:
        raise ValueError(f"calibration {path}: constants miss {missing} (has {sorted(c)})")
    for k, (lo, hi, unit) in RANGES.items():
        _number(path, f"constants.{k}", c[k], lo, hi, unit)
    for k in ("a2a_gbs", "p2p_gbs"):
        if not isinstance(c[k], dict):
            raise ValueError(f"calibration {path}: constants.{k}={c[k]!r}; valid: {{group size: GB/s}}")
        for size, bw in c[k].items():
            if not str(size).isdigit() or int(size) < 2:
                raise ValueError(f"calibration {path}: constants.{k} has group size {size!r}; valid: integers >= 2")
            _number(path, f"constants.{k}[{size}]", bw, 1e-6, MAX_GBS, "GB/s", above=True)
    m = doc["model"]
    missing = [k for k in (*MODEL_KEYS, "checkpointing", "causal") if k not in m]
    if missing:
        raise ValueError(f"calibration {path}: model misses {missing}")
    if m["checkpointing"] not in RECOMPUTE:
        raise ValueError(f"calibration {path}: model.checkpointing={m['checkpointing']!r}; valid: "
                         f"{sorted(RECOMPUTE)}")  # fmt: skip
    for k in MODEL_KEYS:
        if k != "swiglu" and not (isinstance(m[k], int) and not isinstance(m[k], bool) and m[k] > 0):
            raise ValueError(f"calibration {path}: model.{k}={m[k]!r}; valid: a positive integer")
    return doc


MAX_GBS = 5000.0  # a link faster than a few TB/s is not a measurement
RANGES = {  # constant: (lowest, highest, unit)
    "alpha1_ms": (0.0, 1e6, "ms per token^2"), "alpha2_ms": (0.0, 1e6, "ms per token"),
    "beta_ms": (0.0, 1e6, "ms"), "step_ms": (0.0, 1e6, "ms"), "ring_overlap": (0.0, 1.0, "(a share)"),
    "intra_latency_us": (0.0, 1e6, "us"), "inter_latency_us": (0.0, 1e6, "us"),
}  # fmt: skip


def _number(path: str | Path, field: str, v: Any, lo: float, hi: float, unit: str, above: bool = False) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < lo or v > hi or (above and v <= 0):
        raise ValueError(f"calibration {path}: {field}={v!r}; valid: a number in [{lo:g}, {hi:g}] {unit}")


def _magnitude(path: str, cluster: Cluster, model: ModelShape, a1: float, a2: float) -> None:
    """A fitted constant further than 1000x from what the FLOPs model gives on the profile's hardware is not a
    measurement of this model (a unit slip, a corrupted file)."""
    from planner.cost import CostModel

    ref = CostModel(replace(cluster, calibration=None, alpha1_ms=None, alpha2_ms=None), model).fitted_form()
    for name, got, want in (("alpha1_ms", a1, ref.cluster.alpha1_ms), ("alpha2_ms", a2, ref.cluster.alpha2_ms)):
        if want and got and not want / 1e3 <= got <= want * 1e3:
            raise ValueError(f"calibration {path}: constants.{name}={got:g} is more than 1000x from what the FLOPs "
                             f"model gives for {model.name!r} on cluster {cluster.name!r} ({want:.3g}); valid: "
                             f"{want / 1e3:.3g} to {want * 1e3:.3g}")  # fmt: skip


KERNELS = "attention_kernels"  # a file of measured attention speeds (sp-bench gpu), not of a run's constants


def kernel_file(rates: dict[str, dict[str, float]], hardware: dict[str, Any]) -> dict[str, Any]:
    """A kernel-speed calibration: achieved forward / backward TFLOP/s per kernel (standard count), and the
    fastest one, which plans then assume. Model-independent (measured at llama3's head shape)."""
    best = min(rates, key=lambda k: 1.0 / rates[k]["fwd"] + 2.0 / rates[k]["bwd"])
    return {"format": FORMAT, "kind": KERNELS, "attention_tflops": rates, "attention_kernel": best,
            "hardware": hardware}  # fmt: skip


def _read_kernels(doc: dict[str, Any], path: str | Path) -> dict[str, Any]:
    rates = doc.get("attention_tflops")
    if not isinstance(rates, dict) or not rates:
        raise ValueError(f"calibration {path}: attention_tflops={rates!r}; valid: {{kernel: {{fwd, bwd}}}}")
    for name, r in rates.items():
        if not (
            isinstance(r, dict)
            and set(r) == {"fwd", "bwd"}
            and all(isinstance(v, int | float) and math.isfinite(v) and 0 < v < 1e5 for v in r.values())
        ):
            raise ValueError(f"calibration {path}: attention_tflops.{name}={r!r}; valid: {{fwd: TFLOP/s, bwd: "
                             "TFLOP/s}, each > 0")  # fmt: skip
    if doc.get("attention_kernel") not in rates:
        raise ValueError(f"calibration {path}: attention_kernel={doc.get('attention_kernel')!r}; valid: one of "
                         f"{sorted(rates)}")  # fmt: skip
    return doc


def calibrated(cluster: Cluster, model: ModelShape, causal: bool = True) -> Cluster:
    """``cluster`` with the constants of its ``calibration`` file (unchanged without one): a run's fitted
    constants, or the attention speeds ``sp-bench gpu`` measured (which replace the profile's)."""
    if not cluster.calibration:
        return cluster
    doc = read(cluster.calibration)
    if doc.get("kind") == KERNELS:
        rates = {**cluster.attention_tflops, **doc["attention_tflops"]}
        return replace(cluster, attention_tflops=rates, attention_kernel=doc["attention_kernel"])
    have, want = doc["model"], model_identity(model, causal)
    diff = [f"{k}: {have[k]!r} (file) vs {want[k]!r}" for k in (*MODEL_KEYS, "causal") if have[k] != want[k]]
    if diff:
        raise ValueError(f"cluster.calibration={cluster.calibration!r} was measured with another model "
                         f"({have.get('name')!r}): {'; '.join(diff)}. Calibrate this model (sp-train with "
                         "planner.recalibrate_every) or drop cluster.calibration")  # fmt: skip
    c = doc["constants"]
    _magnitude(str(cluster.calibration), cluster, model, c["alpha1_ms"], c["alpha2_ms"])
    (a0, l0), (a1, l1) = RECOMPUTE[have["checkpointing"]], RECOMPUTE[model.checkpointing]
    return replace(cluster, alpha1_ms=c["alpha1_ms"] * a1 / a0, alpha2_ms=c["alpha2_ms"] * l1 / l0,
                   beta_ms=c["beta_ms"], step_ms=c["step_ms"], ring_overlap=c["ring_overlap"],
                   intra_latency_us=c["intra_latency_us"], inter_latency_us=c["inter_latency_us"],
                   a2a_gbs={**cluster.a2a_gbs, **{int(k): float(v) for k, v in c["a2a_gbs"].items()}},
                   p2p_gbs={**cluster.p2p_gbs, **{int(k): float(v) for k, v in c["p2p_gbs"].items()}})  # fmt: skip


def describe(path: str) -> str:
    """One line naming where a calibration file was measured."""
    doc = read(path)
    if doc.get("kind") == KERNELS:
        h = doc["hardware"]
        return (f"attention speeds {path}: measured by sp-bench gpu on {h.get('device', '?')} (torch "
                f"{h.get('torch', '?')}); plans assume {doc['attention_kernel']}")  # fmt: skip
    h, s = doc["hardware"], doc.get("fitted_at_step")
    err = doc.get("error_after", {}).get("median")
    where = f"{h.get('device', '?')} x {h.get('world', '?')}" + (f" ({h['cluster']})" if h.get("cluster") else "")
    tail = f", step {s}" if s is not None else ""
    return f"calibration {path}: measured on {where}{tail}" + (f", held-out error {err:.1%}" if err is not None else "")
