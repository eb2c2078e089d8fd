"""Sequence tiling (Arctic Long Sequence Training's TiledMLP, extended to the whole layer): everything of a layer
but the attention core runs over tiles of ``model.tile_tokens`` tokens.

A layer's per-token parts are independent token by token: before the attention, the input norm, the fused qkv
projection and Qwen3's q/k norms; after it, the output projection, the residual, the MLP norm, the MLP and its
residual. Under full activation checkpointing the recomputed layer holds all their intermediates for every local
token at once (for Llama-3-8B in bf16 about 24 KiB per token beside the MLP's 140 KiB). Here each part's forward
runs tile by tile without keeping anything but its inputs, and its backward recomputes one tile at a time with
grad enabled and back-propagates it at once: the working set of those parts is one tile's, whatever the local
token count. What stays per token is what the attention core needs (its q, k, v, output and lse) and the layer's
input. An MoE layer tiles the parts before and after the attention; its router and token dispatch see all tokens
(the load-balancing statistics are not per token), and its experts run tiled over their own rows.

Parameter gradients are summed over the tiles and returned by the Function (:mod:`models.param_grads`), so
autograd accumulates each once per backward. Tiling changes no result beyond summation order (tested: equal to
the untiled path within 1e-6 in fp32, through the trainer under every strategy). Cost: one more forward of the
tiled parts per token in backward.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from models.param_grads import param_grads

Run = Callable[..., tuple[torch.Tensor, ...]]


class Tiled(torch.autograd.Function):
    """``run(*tiles) -> tuple of per-token outputs`` over tiles of ``tile`` rows (dim 0) of the ``n_in`` per-token
    inputs; the tensors after them are the parameters ``run`` uses (their gradients are summed over tiles)."""

    @staticmethod
    def forward(ctx: Any, run: Run, tile: int, n_in: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tensors[:n_in]
        with torch.no_grad():
            pieces = [run(*[t[a : a + tile] for t in inputs]) for a in range(0, inputs[0].shape[0], tile)]
        ctx.save_for_backward(*inputs)
        ctx.run, ctx.tile, ctx.params = run, tile, tensors[n_in:]
        return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = ctx.saved_tensors
        wants = ctx.needs_input_grad[3 : 3 + len(inputs)]
        d_in = [torch.zeros_like(t) if w else None for t, w in zip(inputs, wants, strict=True)]
        acc: list[torch.Tensor | None] = [None] * len(ctx.params)  # parameter gradients, summed over tiles
        for a in range(0, inputs[0].shape[0], ctx.tile):
            ts = [t[a : a + ctx.tile].detach().requires_grad_(w) for t, w in zip(inputs, wants, strict=True)]
            with torch.enable_grad():
                outs = ctx.run(*ts)
            wanted = [t for t in ts if t.requires_grad]
            got = param_grads(outs, [g[a : a + ctx.tile] for g in grads], wanted, ctx.params)
            slots = iter(got[: len(wanted)])
            for d in d_in:
                if d is not None:
                    g = next(slots)
                    if g is not None:
                        d[a : a + ctx.tile] = g
            for i, g in enumerate(got[len(wanted) :]):
                if g is not None:
                    acc[i] = g if acc[i] is None else acc[i].add_(g)  # type: ignore[union-attr]
        ctx.params = None
        return (None, None, None, *d_in, *acc)  # one accumulation per parameter and backward


def tiled(run: Run, tile: int, inputs: list[torch.Tensor], module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """``run`` over tiles of ``inputs`` with ``module``'s trainable parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    return Tiled.apply(run, tile, len(inputs), *inputs, *params)  # type: ignore[no-any-return]


def _active(module: Any, hidden: torch.Tensor) -> int:
    """The tile a pass over ``hidden`` runs with, 0 when it runs untiled (short, or no grad: nothing saved)."""
    tile = module.sp_tile
    return tile if tile and hidden.shape[0] > tile and torch.is_grad_enabled() else 0


def _tile_mlp(mlp: Any) -> None:
    """A Megatron ``MLP`` (an MoE expert's too) over tiles of its rows; per-token tensors passed with the rows
    (an expert's routing weights, Megatron's ``per_token_scale``) are tiled with them, differentiable."""
    forward = mlp.forward

    def run_tiled(self: Any, hidden: torch.Tensor, *args: Any, _forward: Any = forward, **kwargs: Any) -> tuple:
        tile = _active(self, hidden)
        if not tile:
            return _forward(hidden, *args, **kwargs)
        slots = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.dim() and a.shape[0] == hidden.shape[0]]

        def run(x: torch.Tensor, *tiles: torch.Tensor) -> tuple[torch.Tensor]:
            full = list(args)
            for i, t in zip(slots, tiles, strict=True):
                full[i] = t
            out, bias = _forward(x, *full, **kwargs)
            return (out if bias is None else out + bias,)

        return tiled(run, tile, [hidden, *(args[i] for i in slots)], self)[0], None

    mlp.forward = types.MethodType(run_tiled, mlp)


def _tile_layer(layer: Any) -> None:
    """A Megatron ``TransformerLayer`` with its parts before and after the attention core tiled (the MLP too in a
    dense layer); the attention core gets all local tokens at once."""
    forward = layer.forward

    def run_tiled(self: Any, hidden_states: torch.Tensor, *args: Any, _forward: Any = forward, **kwargs: Any) -> tuple:
        tile = _active(self, hidden_states)
        if not tile or args or kwargs.get("context") is not None or kwargs.get("inference_context") is not None:
            return _forward(hidden_states, *args, **kwargs)
        attn = self.self_attention

        def before(x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [t, 1, h] -> q [t, 1, H, d], k, v [t, 1, kv, d]
            return tuple(attn.get_query_key_value_tensors(self.input_layernorm(x))[:3])

        parts = [self.input_layernorm, attn.linear_qkv, attn.q_layernorm, attn.k_layernorm]
        q, k, v = tiled(before, tile, [hidden_states], torch.nn.ModuleList([m for m in parts if m is not None]))
        core = attn.core_attention(q, k, v, kwargs.get("attention_mask"), attn_mask_type=attn.attn_mask_type,
                                   attention_bias=kwargs.get("attention_bias"),
                                   packed_seq_params=kwargs.get("packed_seq_params"))  # fmt: skip
        dense = not self.is_moe_layer

        def after(c: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor]:  # c [t, 1, H d], x [t, 1, h] -> [t, 1, h]
            out, bias = attn.linear_proj(c)
            y = x + (out if bias is None else out + bias)
            if dense:
                out, bias = self.mlp(self.pre_mlp_layernorm(y))
                y = y + (out if bias is None else out + bias)
            return (y,)

        parts = [attn.linear_proj] + ([self.pre_mlp_layernorm, self.mlp] if dense else [])
        y = tiled(after, tile, [core, hidden_states], torch.nn.ModuleList(parts))[0]
        if not dense:  # the router and the dispatch over all tokens; the experts tile their own rows
            y = self._forward_mlp(y, None, padding_mask=kwargs.get("padding_mask"))
        return y, kwargs.get("context")

    layer.forward = types.MethodType(run_tiled, layer)


def install(model: torch.nn.Module, tile: int) -> None:
    """Every Megatron ``TransformerLayer`` and ``MLP`` of ``model`` runs tiled over ``tile`` tokens
    (``model.tile_tokens``). :func:`set_tile` changes the tile between passes (0: untiled), so the planner
    can choose it per micro-step; a pass keeps the tile it started with for its backward."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    tiles = [m for m in model.modules() if isinstance(m, (MLP, TransformerLayer))]
    model.sp_tiled = tiles  # type: ignore[assignment]  # set_tile reaches them without a module walk
    for m in tiles:
        m.sp_tile = m.sp_tile_default = tile
        (_tile_mlp if isinstance(m, MLP) else _tile_layer)(m)


def set_tile(model: torch.nn.Module, tile: int | None) -> None:
    """The sequence tile of the next passes (None: the one installed; 0: untiled). Raises where the model was
    built without tiling and ``tile`` asks for it."""
    tiles: list[Any] = getattr(model, "sp_tiled", [])
    if not tiles and tile:
        raise ValueError(f"the plan asks for tile_tokens={tile}; the model was built without sequence tiling "
                         "(set model.tile_tokens or planner.tile_tokens)")  # fmt: skip
    for m in tiles:
        m.sp_tile = m.sp_tile_default if tile is None else tile
