"""flash-attn 2 on CUDA: the call geometry (bottom-right causal alignment), batched varlen ring steps, the
fused backward fed the final (out, lse), calls by the private functions' real parameter names, and the
install check."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sp.kernels.base import compute_dtype, lse_dtype
from sp.kernels.varlen import Call, VarlenCall, VarlenKernel, bottom_right_calls

FlashCall = tuple[int, int, int, bool]  # (first query row, end row, keys, causal)


def flash_calls(nq: int, nk: int, q_pos: int, k_pos: int, mask: bool) -> list[FlashCall]:
    """A pair as flash-attn calls (:func:`sp.kernels.varlen.bottom_right_calls`; keys always start at 0)."""
    return [(r0, r1, k1, causal) for r0, r1, _, k1, causal in bottom_right_calls(nq, nk, q_pos, k_pos, mask)]


_FLASH_DEFAULTS: dict[str, Any] = {
    "dropout_p": 0.0,
    "window_size": (-1, -1),  # flash-attn <= 2.6
    "window_size_left": -1,  # flash-attn >= 2.7
    "window_size_right": -1,
    "softcap": 0.0,
    "alibi_slopes": None,
    "deterministic": False,
    "rng_state": None,
}


def parameter_names(fn: Callable[..., Any]) -> set[str]:
    """The named parameters ``fn`` really takes. flash-attn >= 2.7 on torch >= 2.4 wraps its private
    ``_flash_attn_backward`` / ``_flash_attn_varlen_backward`` in ``torch.library.custom_op``: the wrapper's
    own signature is ``(*args, **kwargs)``; the wrapped function (``_init_fn``) or the op's schema has the
    real one. A callable whose names cannot be read is an error, never a call with every argument dropped."""
    import inspect

    fn = inspect.unwrap(fn)
    init = getattr(fn, "_init_fn", None)  # torch.library.CustomOpDef
    if init is not None:
        return set(inspect.signature(init).parameters)
    schema = getattr(fn, "_schema", None)  # a torch.ops OpOverload
    if schema is not None:
        return {a.name for a in schema.arguments}
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if not named:
        raise TypeError(f"cannot read the parameter names of {fn!r}: its signature is {inspect.signature(fn)}")
    return named


def _by_name(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments its signature has: flash-attn's private functions gained and
    renamed parameters across 2.x releases (window_size -> window_size_left/right, softcap)."""
    params = parameter_names(fn)
    return fn(**{k: v for k, v in {**_FLASH_DEFAULTS, **kwargs}.items() if k in params})


@dataclass(frozen=True)
class FlashKernel(VarlenKernel):
    """flash-attn 2 on CUDA (bf16/fp16), called as :func:`flash_calls` splits a pair: forward with
    ``flash_attn_func``, backward fused with flash-attn's ``_flash_attn_backward`` fed the *final* (out, lse)
    (what ring-flash-attn does), so no score matrix is materialised. ``impl`` / ``backward_impl`` replace
    them (tests use CPU stand-ins with flash-attn's conventions: bottom-right causal mask, ``softmax_lse``
    of shape [batch, heads, seqlen_q], +inf for a row that sees no key, gradients written into dq/dk/dv)."""

    impl: Callable[..., Any] | None = None
    backward_impl: Callable[..., Any] | None = None
    tile_rows: int | None = None  # flash's memory is linear in the rows: pairs go whole, never tiled
    varlen_impl: Callable[..., Any] | None = None
    varlen_backward_impl: Callable[..., Any] | None = None
    half_only: bool = True
    name = "flash"

    def _func(self) -> Callable[..., Any]:
        if self.impl is not None:
            return self.impl
        from flash_attn.flash_attn_interface import flash_attn_func

        return flash_attn_func  # type: ignore[no-any-return]

    def _backward_func(self) -> Callable[..., Any]:
        if self.backward_impl is not None:
            return self.backward_impl
        from flash_attn.flash_attn_interface import _flash_attn_backward

        return _flash_attn_backward  # type: ignore[no-any-return]

    def _varlen(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        if self.varlen_impl is not None and self.varlen_backward_impl is not None:
            return self.varlen_impl, self.varlen_backward_impl
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, flash_attn_varlen_func

        return flash_attn_varlen_func, _flash_attn_varlen_backward

    def calls(self, nq: int, nk: int, q_pos: int, k_pos: int, mask: bool) -> list[Call]:
        return bottom_right_calls(nq, nk, q_pos, k_pos, mask)

    def op_forward(self, q, k, v, call: VarlenCall, scale: float):
        fwd, _ = self._varlen()
        o, l_, _ = _by_name(fwd, q=q, k=k, v=v, cu_seqlens_q=call.cu_q, cu_seqlens_k=call.cu_k, max_seqlen_q=call.max_q,
                            max_seqlen_k=call.max_k, softmax_scale=scale, causal=call.causal,
                            return_attn_probs=True)  # fmt: skip
        l_ = _varlen_lse(l_, call.cu_q_host)  # [h, total q rows]
        return o, torch.where(torch.isposinf(l_), float("-inf"), l_)

    def op_backward(self, dout, q, k, v, out, lse, call: VarlenCall, scale: float):
        _, bwd = self._varlen()
        bq, bk, bv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _by_name(bwd, dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=bq, dk=bk, dv=bv,
                 cu_seqlens_q=call.cu_q, cu_seqlens_k=call.cu_k, max_seqlen_q=call.max_q, max_seqlen_k=call.max_k,
                 softmax_scale=scale, causal=call.causal)  # fmt: skip
        return bq, bk, bv

    def forward(self, q, k, v, q_pos, k_pos, mask, scale):
        self.check(q)
        nq, h, d = q.shape
        fn = self._func()
        out = q.new_zeros(nq, h, d, dtype=compute_dtype(q.dtype))
        lse_dt = lse_dtype(q.dtype)
        lse = torch.full((h, nq), float("-inf"), dtype=lse_dt, device=q.device)
        for a, b, keys, causal in flash_calls(nq, k.shape[0], q_pos, k_pos, mask):
            # [n, h, d] -unsqueeze-> [1, n, h, d] (flash's batch dim)
            o, l_, _ = fn(q[a:b][None], k[:keys][None], v[:keys][None], softmax_scale=scale, causal=causal,
                          return_attn_probs=True)  # fmt: skip
            out[a:b] = o[0]
            l_ = l_[0, :, : b - a].to(lse.dtype)  # [h, rows]; older versions pad seqlen_q
            lse[:, a:b] = torch.where(torch.isposinf(l_), float("-inf"), l_)  # flash: +inf = no key seen
        return out, lse

    def backward(self, dout, q, k, v, out, lse, q_pos, k_pos, mask, scale):
        """Block gradients from the final (out, lse); accumulated in the compute dtype (fp32 for bf16)."""
        fn = self._backward_func()
        cd = compute_dtype(q.dtype)
        lse_dt = lse_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)
        for a, b, keys, causal in flash_calls(q.shape[0], k.shape[0], q_pos, k_pos, mask):
            # [n, h, d] -unsqueeze-> [1, n, h, d]; lse [h, n] -slice, unsqueeze-> [1, h, rows] (flash layout)
            qb, kb, vb = q[a:b][None], k[:keys][None].contiguous(), v[:keys][None].contiguous()
            bq, bk, bv = torch.empty_like(qb), torch.empty_like(kb), torch.empty_like(vb)
            _by_name(fn, dout=dout[a:b][None].contiguous(), q=qb.contiguous(), k=kb, v=vb,
                     out=out[a:b][None].contiguous(), softmax_lse=lse[:, a:b][None].to(lse_dt).contiguous(),
                     dq=bq, dk=bk, dv=bv, softmax_scale=scale, causal=causal)  # fmt: skip
            dq[a:b] += bq[0]
            dk[:keys] += bk[0]
            dv[:keys] += bv[0]
        return dq, dk, dv


def _varlen_lse(lse: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """flash-attn's varlen ``softmax_lse`` as ``[h, total]``: releases before 2.5 pad it to
    ``[batch, h, max_seqlen]``, later ones return ``[h, total]``."""
    if lse.dim() == 2:
        return lse
    cuts = cu.tolist()  # the host copy of cu_seqlens: no device sync
    # [batch, h, max_seqlen] -slice each sequence-> [h, n_i] -cat-> [h, total]
    return torch.cat([lse[i, :, : cuts[i + 1] - cuts[i]] for i in range(len(cuts) - 1)], dim=1)


FLASH_INSTALL = (
    "MAX_JOBS=8 pip install --no-build-isolation --no-cache-dir 'flash-attn==2.8.3' (needs nvcc and "
    "ninja; or `make gpu-deps`; see the README's 'GPU install')"
)


@functools.cache
def flash_attn_status() -> str | None:
    """None when flash-attn's CUDA extension loads; else why not, in one line. A flash-attn built against
    another torch passes ``find_spec`` and then fails on its first import with an undefined C++ symbol (the
    torch ABI changed): that case is named as such, with the rebuild command."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return f"flash-attn is not installed: {FLASH_INSTALL}"
    try:
        version = importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    try:
        import flash_attn.flash_attn_interface  # noqa: F401  (loads flash_attn_2_cuda)
    except (ImportError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "undefined symbol" in msg:
            return (
                f"flash-attn {version} is installed but was built against another torch (this is torch "
                f"{torch.__version__}; {msg}); rebuild it: pip uninstall -y flash-attn && {FLASH_INSTALL}"
            )
        return f"flash-attn {version} is installed but does not import ({msg}); reinstall: {FLASH_INSTALL}"
    return None
