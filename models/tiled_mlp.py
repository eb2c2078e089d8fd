"""Tiled MLP (Arctic Long Sequence Training's TiledMLP): each layer's MLP over tiles of tokens.

A SwiGLU MLP's intermediates are about ``5 f b`` bytes per token (f = ffn width: 14336 for Llama-3-8B, so
~140 KiB per bf16 token, 2.2 GiB at 16K local tokens), and under full activation checkpointing the
recomputed layer holds them for every local token at once. Here the forward runs the MLP tile by tile without
keeping anything but its input; the backward recomputes one tile at a time with grad enabled and
back-propagates it at once, so the MLP working set is one tile's, whatever the local token count. Parameter
gradients are summed over the tiles in place and returned by the Function (:mod:`models.param_grads`), so
autograd accumulates each once per backward (FSDP2's post-backward and replicated training's hooks see one
final gradient). Each token's MLP is independent of the others, so tiling changes no result
beyond summation order (tested: equal to the untiled path within 1e-6 in fp32). Cost: one extra MLP
forward per token in backward.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from models.param_grads import param_grads


class TiledMLP(torch.autograd.Function):
    """``out = mlp(x)`` over tiles of ``tile`` tokens of x ``[s, b, h]`` (dim 0)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, run: Any, tile: int, *params: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = torch.cat([run(x[a : a + tile]) for a in range(0, x.shape[0], tile)])
        ctx.save_for_backward(x)
        ctx.run, ctx.tile, ctx.params = run, tile, params
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        acc: list[torch.Tensor | None] = [None] * (1 + len(ctx.params))
        for a in range(0, x.shape[0], ctx.tile):
            xt = x[a : a + ctx.tile].detach().requires_grad_(True)
            with torch.enable_grad():
                out = ctx.run(xt)
            acc = param_grads(out, grad[a : a + ctx.tile], xt, ctx.params, acc)  # parameter grads summed in place
            dx[a : a + ctx.tile] = acc[0]  # type: ignore[assignment]
        ctx.params = None
        return (dx, None, None, *acc[1:])  # one accumulation per parameter and backward


def install(model: torch.nn.Module, tile: int) -> None:
    """Every Megatron ``MLP`` of ``model`` runs tiled over ``tile`` tokens (``model.mlp_tile_tokens``).
    :func:`set_tile` changes the tile between passes (0: untiled), so the planner can choose it per
    micro-step; a pass keeps the tile it started with for its backward."""
    from megatron.core.transformer.mlp import MLP

    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    model.sp_tiled_mlps = mlps  # type: ignore[assignment]  # set_tile reaches them without a module walk
    for mlp in mlps:
        forward = mlp.forward
        mlp.sp_tile = mlp.sp_tile_default = tile

        def tiled(self: Any, hidden: torch.Tensor, *args: Any, _forward: Any = forward, **kwargs: Any) -> tuple:
            tile = self.sp_tile
            if not tile or hidden.shape[0] <= tile or not torch.is_grad_enabled():
                return _forward(hidden, *args, **kwargs)

            def run(x: torch.Tensor) -> torch.Tensor:
                out, bias = _forward(x, *args, **kwargs)
                return out if bias is None else out + bias

            params = [p for p in self.parameters() if p.requires_grad]
            return TiledMLP.apply(hidden, run, tile, *params), None

        mlp.forward = types.MethodType(tiled, mlp)


def set_tile(model: torch.nn.Module, tile: int | None) -> None:
    """The MLP tile of the next passes (None: the one installed; 0: untiled). Raises where the model was
    built without the tiled MLP and ``tile`` asks for it."""
    mlps: list[Any] = getattr(model, "sp_tiled_mlps", [])
    if not mlps and tile:
        raise ValueError(f"the plan asks for mlp_tile_tokens={tile}; the model was built without the tiled MLP "
                         "(set model.mlp_tile_tokens or planner.mlp_tile_tokens)")  # fmt: skip
    for m in mlps:
        m.sp_tile = m.sp_tile_default if tile is None else tile
