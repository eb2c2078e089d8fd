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
    """``out = mlp(x, *aligned)`` over tiles of ``tile`` tokens of x ``[s, b, h]`` or ``[tokens, h]`` (dim 0);
    ``aligned`` are per-token tensors sliced with x (an MoE expert's routing weights, Megatron's
    ``per_token_scale``), differentiable like x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, run: Any, tile: int, n_aligned: int, *tensors: torch.Tensor) -> torch.Tensor:
        aligned = tensors[:n_aligned]
        with torch.no_grad():
            out = torch.cat([run(x[a : a + tile], [t[a : a + tile] for t in aligned])
                             for a in range(0, x.shape[0], tile)])  # fmt: skip
        ctx.save_for_backward(x, *aligned)
        ctx.run, ctx.tile, ctx.params = run, tile, tensors[n_aligned:]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *aligned = ctx.saved_tensors
        dx = torch.empty_like(x)
        d_aligned = [torch.zeros_like(t) if t.requires_grad else None for t in aligned]
        acc: list[torch.Tensor | None] = [None] * len(ctx.params)  # parameter gradients, summed over tiles
        for a in range(0, x.shape[0], ctx.tile):
            xt = x[a : a + ctx.tile].detach().requires_grad_(True)
            ts = [t[a : a + ctx.tile].detach().requires_grad_(t.requires_grad) for t in aligned]
            with torch.enable_grad():
                out = ctx.run(xt, ts)
            wanted = [t for t in ts if t.requires_grad]
            got = param_grads(out, grad[a : a + ctx.tile], xt, (*wanted, *ctx.params))
            dx[a : a + ctx.tile] = got[0]  # type: ignore[assignment]
            slots = iter(got[1 : 1 + len(wanted)])
            for d in d_aligned:
                if d is not None:
                    g = next(slots)
                    if g is not None:
                        d[a : a + ctx.tile] = g
            for i, g in enumerate(got[1 + len(wanted) :]):
                if g is not None:
                    acc[i] = g if acc[i] is None else acc[i].add_(g)  # type: ignore[union-attr]
        ctx.params = None
        return (dx, None, None, None, *d_aligned, *acc)  # one accumulation per parameter and backward


def install(model: torch.nn.Module, tile: int) -> None:
    """Every Megatron ``MLP`` of ``model`` (MoE experts included) runs tiled over ``tile`` tokens
    (``model.mlp_tile_tokens``). :func:`set_tile` changes the tile between passes (0: untiled), so the planner
    can choose it per micro-step; a pass keeps the tile it started with for its backward."""
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
            # per-token tensors (an expert's routing weights) are tiled with the tokens; the rest pass as they are
            slots = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.dim() and a.shape[0] == hidden.shape[0]]

            def run(x: torch.Tensor, tiles: list[torch.Tensor]) -> torch.Tensor:
                full = list(args)
                for i, t in zip(slots, tiles, strict=True):
                    full[i] = t
                out, bias = _forward(x, *full, **kwargs)
                return out if bias is None else out + bias

            params = [p for p in self.parameters() if p.requires_grad]
            aligned = [args[i] for i in slots]
            return TiledMLP.apply(hidden, run, tile, len(aligned), *aligned, *params), None

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
