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


def param_grads(out: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
                params: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:  # fmt: skip
    """``d(out . grad)`` with respect to ``(x, *params)``: None where one does not reach ``out``."""
    return list(torch.autograd.grad(out, [x, *params], grad, allow_unused=True))
