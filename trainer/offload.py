"""Activation offload: a fully checkpointed layer's input kept in host memory between forward and backward.

Under full checkpointing each layer keeps only its input, ``b h`` bytes per local token and layer (4 GiB per
layer-stack of Llama-3-8B at 16K local tokens in bf16). In ``offload`` mode (a checkpointing mode the planner
may choose per micro-step) the layer runs without saving anything, its input is copied to host memory, and
the backward copies it back, recomputes the layer with grad enabled and back-propagates through it at once.
The parameter gradients are returned as the Function's own (its parameters are inputs), so autograd
accumulates each once per backward, and post-accumulate hooks (:class:`trainer.grad_sync.GradSync`) fire once
per backward, as they do for any other layer; FSDP2's post-backward reads them as usual. On CUDA the
device-to-host copy goes to pinned memory on a side stream (it overlaps the next layers' forward); the
host-to-device copy before the recompute is on the critical path (the cost model charges it).
On the CPU the "host" copy is a real copy into a separate buffer, so exactness and byte counts are tested
here. :class:`OffloadCounter` counts the bytes held on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.param_grads import param_grads


@dataclass
class OffloadCounter:
    """Bytes this rank has offloaded in the current micro-step (reset by the step loop)."""

    bytes: int = 0
    peak: int = 0
    _live: int = 0

    def add(self, n: int) -> None:
        self.bytes += n
        self._live += n
        self.peak = max(self.peak, self._live)

    def release(self, n: int) -> None:
        self._live -= n

    def reset(self) -> None:
        self.bytes = self.peak = self._live = 0


_STREAM: dict[int, Any] = {}


def _to_host(x: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda:
        return x.detach().clone()  # a separate buffer (what pinned host memory is on a GPU node)
    dev = x.device.index or 0
    stream = _STREAM.setdefault(dev, torch.cuda.Stream(x.device))
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        host.copy_(x.detach(), non_blocking=True)
    x.record_stream(stream)  # x's memory stays allocated until the copy has run
    return host


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host.clone()
    stream = _STREAM.get(device.index or 0)
    if stream is not None:
        torch.cuda.current_stream(device).wait_stream(stream)  # the offload copy has finished
    return host.to(device, non_blocking=True)


class OffloadedLayer(torch.autograd.Function):
    """``out = run(hidden)`` with nothing saved on the device: ``hidden`` lives on the host until backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, run: Any, counter: OffloadCounter, *params: torch.Tensor) -> Any:
        with torch.no_grad():
            out = run(hidden)
        ctx.host, ctx.run, ctx.counter, ctx.device = _to_host(hidden), run, counter, hidden.device
        ctx.params = params  # not saved tensors: the recompute reads the module's own (FSDP-unsharded) ones
        ctx.nbytes = hidden.numel() * hidden.element_size()
        counter.add(ctx.nbytes)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x = _to_device(ctx.host, ctx.device).requires_grad_(True)
        ctx.counter.release(ctx.nbytes)
        ctx.host = None
        with torch.enable_grad():
            out = ctx.run(x)
        grads = param_grads(out, grad, x, ctx.params)
        ctx.params = None
        return (grads[0], None, None, *grads[1:])


def offloaded(module: torch.nn.Module, counter: OffloadCounter, *args: Any, **kwargs: Any) -> Any:
    """Run a Megatron ``TransformerLayer`` (``hidden_states`` first or by name; returns ``(hidden,
    context)``) with its input offloaded."""
    extra: list[Any] = []
    if args:
        hidden, args = args[0], args[1:]
    else:
        hidden = kwargs.pop("hidden_states")

    def run(x: torch.Tensor) -> torch.Tensor:
        out = module(x, *args, **kwargs)
        extra[:] = list(out[1:]) if isinstance(out, tuple) else []
        return out[0] if isinstance(out, tuple) else out

    params = [p for p in module.parameters() if p.requires_grad]
    y = OffloadedLayer.apply(hidden, run, counter, *params)
    return (y, *extra[:1]) if extra else y
