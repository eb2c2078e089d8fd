"""Which attention kernel a run uses: the one ``train.kernel`` names, or (``auto``) the fastest exact one.

- CPU: ``cpu_fused`` (torch's fused CPU op; any dtype).
- CUDA, bf16/fp16: every fused kernel this machine has (torch's flash op, torch's cuDNN op, the flash-attn
  package when it loads) is checked against the float64 reference on a small causal GQA batch and timed
  forward + backward at the model's head shape; the fastest exact one runs. ``torch_fa3`` / ``torch_fa4``
  (torch's flash ops switched to FlashAttention-3 / 4) are used when named, since activating them switches
  the ops process-wide.
- CUDA, fp32: no fused kernel takes fp32. The reference kernel would materialise fp32 score tiles of
  ``512 x keys`` per head, so ``auto`` refuses, naming that memory; ``train.kernel=torch`` accepts it.

A named kernel is checked against the device and dtype before anything is built (an fp32 run on a half-only
kernel is refused with the valid choices).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sp.kernels import FUSED_CUDA, KERNELS, TILE_ROWS

CPU_KERNELS = ("cpu_fused", "torch")
AUTO_CUDA = ("cudnn", "torch_flash", "flash")  # probed by ``auto``, in this order (ties keep the first)


@dataclass(frozen=True)
class KernelChoice:
    name: str
    why: str  # one line for the start-up log


def reference_tile_gib(max_len: int, heads: int) -> float:
    """fp32 bytes of the reference kernel's score tile and its softmax (``512 x keys`` per head, two copies)."""
    return 2 * TILE_ROWS * max_len * heads * 4 / 2**30


def choose(setting: str, device: torch.device, dtype: torch.dtype, max_len: int, heads: int, kv_heads: int,
           head_dim: int, probe: Callable[[str], float | None] | None = None) -> KernelChoice:  # fmt: skip
    """The kernel for ``train.kernel=setting`` on ``device`` computing in ``dtype``. ``probe(name)`` times one
    kernel (seconds, None when it is not exact or does not run here); default :func:`probe_kernel`."""
    half = dtype in (torch.float16, torch.bfloat16)
    valid = ("auto", *KERNELS, "ring_flash")
    if setting not in valid:
        raise ValueError(f"train.kernel={setting!r}; valid: {list(valid)}")
    if device.type != "cuda":
        if setting in ("auto", *CPU_KERNELS):
            name = "cpu_fused" if setting == "auto" else setting
            return KernelChoice(name, f"{name} (the CPU)")
        raise ValueError(f"train.kernel={setting!r} needs CUDA; valid on the CPU: {['auto', *CPU_KERNELS]}")
    tile = reference_tile_gib(max_len, heads)
    if setting in (*FUSED_CUDA, "ring_flash") and not half:
        raise ValueError(f"train.kernel={setting!r} takes bf16/fp16 and this run computes in {dtype} "
                         f"(train.precision); use train.precision=bf16, or train.kernel=torch (the reference "
                         f"kernel: {tile:.1f} GiB of fp32 score tiles at {max_len} keys)")  # fmt: skip
    if setting != "auto":
        return KernelChoice(setting, f"{setting} (train.kernel)")
    if not half:
        raise ValueError(f"no fused attention kernel takes {dtype} on CUDA ({', '.join(AUTO_CUDA)} need bf16/fp16); "
                         f"the reference kernel would hold {tile:.1f} GiB of fp32 score tiles per call at "
                         f"data.max_len={max_len} ({heads} heads x {TILE_ROWS} rows x {max_len} keys); use "
                         "train.precision=bf16, or name it with train.kernel=torch")  # fmt: skip
    probe = probe or (lambda name: probe_kernel(name, device, dtype, heads, kv_heads, head_dim))
    timed = {name: probe(name) for name in AUTO_CUDA}
    ok = {n: t for n, t in timed.items() if t is not None}
    if not ok:
        raise ValueError(f"no fused attention kernel runs on this GPU ({', '.join(AUTO_CUDA)} failed or were "
                         f"inexact); the reference kernel would hold {tile:.1f} GiB of fp32 score tiles per call at "
                         f"data.max_len={max_len}: name it with train.kernel=torch to accept that")  # fmt: skip
    best = min(ok, key=lambda n: ok[n])
    summary = ", ".join(f"{n} {t * 1e3:.2f} ms" if t is not None else f"{n} n/a" for n, t in timed.items())
    return KernelChoice(best, f"{best} (fastest exact of: {summary})")


def probe_kernel(name: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                 tokens: int = 8192) -> float | None:  # fmt: skip
    """Seconds for one causal forward + backward of ``tokens`` tokens (two sequences) with kernel ``name``,
    after checking it against the float64 reference on a small batch; None when it cannot run or is inexact."""
    import sp
    from sp.kernels import get_kernel

    try:
        get_kernel(name)
        err = max(exactness(name, device, dtype, heads, kv_heads, head_dim).values())
        if err > 5e-2:  # bf16 inputs: a wrong mask or layout gives O(1) errors
            return None
        ctx = sp.SPContext(sp.GroupLayout.build([0, tokens // 4, tokens]), 0, kernel=name, device=str(device))
        q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        times = []
        for _ in range(3):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            sp.attention(q, k, v, ctx).sum().backward()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:])
    except (ValueError, RuntimeError, NotImplementedError):
        return None


def exactness(name: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
              lengths: tuple[int, ...] = (97, 193, 265)) -> dict[str, float]:  # fmt: skip
    """Relative errors of out, dq, dk and dv of kernel ``name`` in ``dtype`` against the reference kernel in
    float64 (``sp.kernels.TorchKernel``, same inputs), on one causal varlen batch of ``lengths`` (defaults
    that are not multiples of any kernel's blocks)."""
    import sp

    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    g = torch.Generator(device="cpu").manual_seed(cu[-1])
    q, k, v, do = (torch.randn(cu[-1], h, head_dim, generator=g) for h in (heads, kv_heads, kv_heads, heads))
    results = []
    for kern, dt in ((name, dtype), ("torch", torch.float64)):
        ctx = sp.SPContext(sp.GroupLayout.build(cu), 0, kernel=kern, device=str(device))
        xq, xk, xv = (x.to(device, dt, copy=True).requires_grad_(True) for x in (q, k, v))
        out = sp.attention(xq, xk, xv, ctx)
        out.backward(do.to(device, dt))
        results.append([out.detach(), *(x.grad for x in (xq, xk, xv))])
    errs = {f"{n}_rel_err": _rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True)}
    return errs | _pair_errors(name, device, dtype, heads, kv_heads, head_dim)


# (q rows, k rows, q position, k position, causal): queries past part of the keys, rows that see no key, full
PAIRS = ((64, 96, 96, 0, True), (80, 48, 0, 24, True), (64, 64, 128, 0, False))


def _pair_errors(name: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                 head_dim: int) -> dict[str, float]:  # fmt: skip
    """The block kernel on pairs at offsets, as ring steps call it (one rank only meets diagonal pairs, where
    top-left and bottom-right causal alignment agree): forward, and backward from the reference's (out, lse)."""
    from sp.kernels import TorchKernel, get_kernel

    kern, ref, scale = get_kernel(name), TorchKernel(), head_dim**-0.5
    g = torch.Generator(device="cpu").manual_seed(1)
    worst = {"pair_out_rel_err": 0.0, "pair_grad_rel_err": 0.0}
    for nq, nk, qp, kp, mask in PAIRS:
        q, k, v, do = (torch.randn(n, h, head_dim, generator=g) for n, h in ((nq, heads), (nk, kv_heads),
                                                                            (nk, kv_heads), (nq, heads)))  # fmt: skip
        r_out, r_lse = ref.forward(q.double(), k.double(), v.double(), qp, kp, mask, scale)
        r_grads = ref.backward(do.double(), q.double(), k.double(), v.double(), r_out, r_lse, qp, kp, mask, scale)
        xq, xk, xv, xdo = (t.to(device, dtype) for t in (q, k, v, do))
        out, _ = kern.forward(xq, xk, xv, qp, kp, mask, scale)
        grads = kern.backward(xdo, xq, xk, xv, r_out.to(device, dtype), r_lse.to(device, torch.float32), qp, kp, mask,
                              scale)  # fmt: skip
        seen = r_lse.isfinite().T[..., None]  # rows that see no key: out 0 in both
        worst["pair_out_rel_err"] = max(worst["pair_out_rel_err"], _rel(out.cpu() * seen, r_out * seen))
        worst["pair_grad_rel_err"] = max(
            worst["pair_grad_rel_err"], *(_rel(a.cpu(), b) for a, b in zip(grads, r_grads))
        )
    return worst


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.cpu()).norm() / b.norm().clamp_min(1e-30))
