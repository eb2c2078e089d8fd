"""Run-cost estimate: how long, how many GPU-hours and how many dollars a training run of ``tokens`` tokens
takes under a series of sampled step times.

Per sampled step i: tokens k_i, predicted step time t_i, useful model FLOPs F_i. The run's throughput is
sum k / sum t (a ratio of sums: long steps weigh by their time), so

    steps = ceil(tokens / mean k),  wall = tokens / (sum k / sum t),  GPU-hours = wall x N,
    dollars = GPU-hours x usd_per_gpu_hour,  tokens/s per GPU = (sum k / sum t) / N,
    MFU = sum F / (sum t x N x peak).

The spread (p10 / p50 / p90) is a bootstrap over the sampled steps (``resamples`` draws with replacement,
fixed seed): it shows how much the estimate depends on which batches were sampled, so a user sees whether
20 sampled steps are enough. A run of identical steps has p10 = p50 = p90.
"""

from __future__ import annotations

import math

import numpy as np

QUANTILES = {"p10": 10, "p50": 50, "p90": 90}


def run_cost(
    step_s: list[float], step_tokens: list[float], step_flops: list[float], tokens: float, world: int,
    peak_tflops: float, usd_per_gpu_hour: float | None, resamples: int = 1000, seed: int = 0,
) -> dict:  # fmt: skip
    if tokens <= 0:
        raise ValueError(f"run.tokens={tokens}; valid: > 0 (tokens the whole run trains on, e.g. 2e11)")
    t, k, f = (np.asarray(x, dtype=float) for x in (step_s, step_tokens, step_flops))
    if len(t) == 0 or (t <= 0).any() or (k <= 0).any():
        raise ValueError("run cost needs at least one sampled step with positive time and tokens")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(resamples, len(t)))  # [resamples, steps]
    rate = k[idx].sum(axis=1) / t[idx].sum(axis=1)  # tokens/s per resample
    mfu = f[idx].sum(axis=1) / (t[idx].sum(axis=1) * world * peak_tflops * 1e12)
    wall_h = tokens / rate / 3600.0

    def spread(values: np.ndarray) -> dict[str, float]:
        return {name: float(np.percentile(values, q)) for name, q in QUANTILES.items()}

    out = {
        "steps": math.ceil(tokens / k.mean()),
        "wall_hours": spread(wall_h),
        "gpu_hours": spread(wall_h * world),
        "tokens_per_s_per_gpu": spread(rate / world),
        "mfu": spread(mfu),
        "usd": spread(wall_h * world * usd_per_gpu_hour) if usd_per_gpu_hour is not None else None,
    }
    return out
