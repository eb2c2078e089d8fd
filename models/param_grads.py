"""Gradients of a recomputed piece of a model, returned through the autograd Function that recomputes it.

:class:`models.tiling.Tiled` and :class:`trainer.offload.OffloadedLayer` run their forward without
saving the graph and recompute it in their backward. Back-propagating the recomputed graph with a nested
``torch.autograd.backward`` would accumulate into every parameter's ``.grad`` once per nested call (once per
tile), so post-accumulate-grad hooks fire several times per backward and a hook that launches a gradient
all-reduce when a parameter's gradient is final (replicated training) would reduce partial sums. Instead the
Functions take their parameters as inputs and return their gradients: autograd then accumulates each exactly
once per backward, as for any other layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def param_grads(outs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:  # fmt: skip
    """``d(sum_i outs_i . grads_i)`` with respect to ``(*inputs, *params)``: None where one does not reach the
    outputs."""
    return list(torch.autograd.grad(list(outs), [*inputs, *params], list(grads), allow_unused=True))
