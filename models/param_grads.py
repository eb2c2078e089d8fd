"""Gradients of a recomputed piece of a model, returned through the autograd Function that recomputes it.

:class:`models.tiled_mlp.TiledMLP` and :class:`trainer.offload.OffloadedLayer` run their forward without
saving the graph and recompute it in their backward. Back-propagating the recomputed graph with a nested
``torch.autograd.backward`` would accumulate into every parameter's ``.grad`` once per nested call (once per
tile), so post-accumulate-grad hooks fire several times per backward and a hook that launches a gradient
all-reduce when a parameter's gradient is final (replicated training) would reduce partial sums. Instead the
Functions take their parameters as inputs and return their gradients: autograd then accumulates each exactly
once per backward, as for any other layer.
"""

from __future__ import annotations

import torch


def param_grads(out: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, params: tuple[torch.Tensor, ...],
                acc: list[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:  # fmt: skip
    """``d(out . grad)`` with respect to ``(x, *params)``: None where one does not reach ``out``. With ``acc``
    (a previous call's result, e.g. the tiles before this one) the parameter gradients are added into it in
    place and ``acc`` is returned with this call's input gradient first."""
    wanted = [x, *params]
    got = torch.autograd.grad(out, wanted, grad, allow_unused=True)
    if acc is None:
        return list(got)
    for i, g in enumerate(got[1:], start=1):
        if g is None:
            continue
        prev = acc[i]
        if prev is None:
            acc[i] = g
        else:
            prev.add_(g)
    acc[0] = got[0]
    return acc
