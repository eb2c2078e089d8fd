"""torch's own flash attention on CUDA: ``aten::_flash_attention_forward`` / ``_backward`` in varlen form.

The CUDA wheel of torch carries FlashAttention-2 (no compiled extension to build); ``impl="FA3"`` / ``"FA4"``
activate the FlashAttention-3 / 4 implementations torch dispatches the same two ops to when their packages are
installed (:func:`torch.nn.attention.activate_flash_attention_impl`). Conventions, read from torch 2.13
(``torch/_meta_registrations.py``, ``torch/nn/attention/varlen.py``): packed ``[total, heads, head_dim]``
inputs with int32 ``cum_seq_q/k``; GQA native (kv heads divide the query heads; the backward returns kv-head
gradients); causal mask aligned bottom-right; the log-sum-exp is fp32 ``[heads, total_q]``, +inf for a row
that sees no key (never called here: the call geometry leaves such rows out); the backward takes the
forward's ``rng_state`` and ``unused`` tensors, which carry nothing at dropout 0.
"""

from __future__ import annotations

import functools

import torch

from sp.kernels.varlen import Call, VarlenCall, VarlenKernel, bottom_right_calls

IMPLS = (None, "FA3", "FA4")


@functools.cache
def _activate(impl: str) -> None:
    """Switch torch's flash ops to ``impl`` once per process (a no-op for FA2, torch's default)."""
    from torch.nn.attention import activate_flash_attention_impl, list_flash_attention_impls

    valid = list_flash_attention_impls()
    if impl not in valid:
        raise ValueError(f"flash attention impl {impl!r} is not registered in torch {torch.__version__}; "
                         f"valid: {valid}")  # fmt: skip
    try:
        activate_flash_attention_impl(impl)
    except (ImportError, ModuleNotFoundError, RuntimeError) as e:
        raise ValueError(f"kernel 'torch_{impl.lower()}' needs the {impl} package for torch: {e}") from e


class TorchFlashKernel(VarlenKernel):
    """``aten::_flash_attention_forward/_backward`` (FA2 in torch, or FA3/FA4 when ``impl`` names one)."""

    def __init__(self, impl: str | None = None, half_only: bool = True) -> None:
        if impl not in IMPLS:
            raise ValueError(f"flash attention impl {impl!r}; valid: {list(IMPLS)}")
        self.impl = impl
        self.half_only = half_only
        self.name = "torch_flash" if impl is None else f"torch_{impl.lower()}"
        if impl is not None:
            _activate(impl)
        self._fwd = torch.ops.aten._flash_attention_forward.default
        self._bwd = torch.ops.aten._flash_attention_backward.default

    def calls(self, nq: int, nk: int, q_pos: int, k_pos: int, mask: bool) -> list[Call]:
        return bottom_right_calls(nq, nk, q_pos, k_pos, mask)

    def op_forward(self, q, k, v, call: VarlenCall, scale: float):
        out, lse, _, _, _ = self._fwd(q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0, call.causal,
                                      False, scale=scale)  # fmt: skip
        return out, torch.where(torch.isposinf(lse), float("-inf"), lse)  # lse [h, n]; +inf = no key seen

    def op_backward(self, dout, q, k, v, out, lse, call: VarlenCall, scale: float):
        rng, unused = _dropout_state(q.device)
        dq, dk, dv = self._bwd(dout, q, k, v, out, lse, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0,
                               call.causal, rng, unused, scale=scale)  # fmt: skip
        return dq, dk, dv


@functools.cache
def _dropout_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rng_state, unused) pair the backward takes; at dropout 0 they carry nothing (what
    ``torch.nn.attention.varlen`` passes). Made once per device."""
    return torch.zeros((2,), dtype=torch.uint64, device=device), torch.empty(0, device=device)
