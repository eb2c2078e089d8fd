"""RMSNorm that saves its input in the compute dtype and one fp32 ``rstd`` per token, and nothing else.

torch's ``RMSNorm`` (what megatron-core's local spec builds) upcasts a half-precision input and saves the fp32
copy and the fp32 normalised values for backward, ``8 h + 4`` bytes per token per norm: with two norms per
layer that is ~64 KiB per token of Llama-3-8B's recomputed layer, the largest item of its working set. Here,
as transformers' and Megatron's fused norms do, the forward accumulates in fp32 inside the op and the
backward recomputes the normalised values from the saved input and ``rstd``: ``b h + 4`` bytes per token,
the input's storage being the residual stream the layer holds anyway. Both passes run over tiles of
:data:`NORM_TILE_TOKENS` tokens, so their fp32 temporaries are one tile's (sequence tiling, as ALST does for
the MLP), whatever the local length.

Same values as ``torch.nn.RMSNorm`` (the weight multiplies in the input's dtype, after the cast): in fp32
within 1e-6, tested against an fp64 formula and against torch's module (:mod:`tests.test_rms_norm`).
"""

from __future__ import annotations

from typing import Any

import torch

from planner.types import NORM_TILE_TOKENS


def _rows(x: torch.Tensor) -> torch.Tensor:
    # [..., h] -reshape-> [tokens, h] (a view for the contiguous tensors norms receive)
    return x.reshape(-1, x.shape[-1])


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, eps: float, tile: int) -> torch.Tensor:
        rows = _rows(x)
        out = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        for a in range(0, rows.shape[0], tile):
            xt = rows[a : a + tile].float()
            r = torch.rsqrt(xt.square().mean(-1) + eps)
            rstd[a : a + tile] = r
            y = (xt * r[:, None]).to(x.dtype)
            out[a : a + tile] = y * weight if weight is not None else y
            del xt, r, y  # one tile's temporaries at a time
        ctx.save_for_backward(x, rstd, weight)
        ctx.tile = tile
        return out.view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        x, rstd, weight = ctx.saved_tensors
        rows, g_rows = _rows(x), _rows(grad.contiguous())
        dx = torch.empty_like(rows)
        dw = torch.zeros(rows.shape[1], dtype=torch.float32, device=x.device) if weight is not None else None
        for a in range(0, rows.shape[0], ctx.tile):
            r = rstd[a : a + ctx.tile, None]
            xhat = rows[a : a + ctx.tile].float() * r
            g = g_rows[a : a + ctx.tile]
            if weight is not None:
                assert dw is not None
                dw += (g * xhat.to(x.dtype)).float().sum(0)
                g = g * weight
            g32 = g.float()
            dx[a : a + ctx.tile] = (r * (g32 - xhat * (g32 * xhat).mean(-1, keepdim=True))).to(x.dtype)
            del r, xhat, g, g32  # one tile's temporaries at a time
        return dx.view(x.shape), (dw.to(weight.dtype) if dw is not None else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, tile: int = NORM_TILE_TOKENS) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape), saving ``x`` and an fp32 rstd per row."""
    out: torch.Tensor = _RMSNorm.apply(x, weight, eps, tile)
    return out


def install(model: torch.nn.Module) -> None:
    """Every ``torch.nn.RMSNorm`` of ``model`` (the layers' two norms, the final norm, Qwen3's q/k norms) runs
    :func:`rms_norm`. Its parameters and state dict are unchanged (HF import/export and FSDP2 see the same
    module)."""
    for m in model.modules():
        if isinstance(m, torch.nn.RMSNorm):
            if len(m.normalized_shape) != 1:
                raise ValueError(f"RMSNorm over {tuple(m.normalized_shape)}: only the last dim is supported")
            m.forward = _forward.__get__(m)  # type: ignore[method-assign]


def _forward(self: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    return rms_norm(x, self.weight, eps)
