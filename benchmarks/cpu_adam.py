"""``sp-bench cpu-adam``: torch's AdamW on this machine's CPUs, the update that optimizer-state offload runs on
the host (``planner.state_offload``; ``cluster.cpu_adam_gparams_per_s`` is the rate per GPU's share of the host).

For each thread count and implementation (``fused``: torch's fused CPU kernel, what the trainer uses for states
on the host; ``foreach``), the best of ``repeats`` steps over ``params`` fp32 elements in 8 tensors, with
gradients set. One JSON object per case: G parameter elements per second, and per thread.
"""

from __future__ import annotations

import time


def run(params: int = 32_000_000, threads: tuple[int, ...] = (1, 2), repeats: int = 3) -> list[dict]:
    import torch

    rows = []
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            ps = [torch.nn.Parameter(torch.randn(params // 8)) for _ in range(8)]
            for p in ps:
                p.grad = torch.randn_like(p)
            for kind in ("fused", "foreach"):
                opt = torch.optim.AdamW(ps, lr=1e-4, **{kind: True})
                opt.step()  # the moments allocated outside the timing
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    opt.step()
                    best = min(best, time.perf_counter() - t0)
                rate = params / best / 1e9
                rows.append({"bench": "cpu_adam", "impl": kind, "threads": n, "params": params,
                             "step_s": round(best, 4), "gparams_per_s": round(rate, 3),
                             "gparams_per_s_per_thread": round(rate / n, 3)})  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return rows
