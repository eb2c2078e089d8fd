"""Activation offload: a fully checkpointed layer's input kept in host memory between forward and backward.

Under full checkpointing each layer keeps only its input, ``b h`` bytes per local token and layer (4 GiB per
layer-stack of Llama-3-8B at 16K local tokens in bf16). In ``offload`` mode (a checkpointing mode the planner
may choose per micro-step) the layer runs without saving anything, its input is copied to host memory, and
the backward copies it back, recomputes the layer with grad enabled and back-propagates through it at once.
The parameter gradients are returned as the Function's own (its parameters are inputs), so autograd
accumulates each once per backward, and post-accumulate hooks (:class:`trainer.grad_sync.GradSync`) fire once
per backward, as they do for any other layer; FSDP2's post-backward reads them as usual. On CUDA the
device-to-host copy goes to pinned memory on a side stream (it overlaps the next layers' forward); in
backward each layer starts the copy of the previous layer's input on that stream (prefetch), so it runs under
this layer's recompute and backward (two layer inputs on the device at a time; the cost model charges the
copy time where it exceeds the compute).
On the CPU the "host" copy is a real copy into a separate buffer, so exactness and byte counts are tested
here. :class:`OffloadCounter` counts the bytes held on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from models.param_grads import param_grads


@dataclass
class OffloadCounter:
    """Bytes this rank has offloaded in the current micro-step (reset by the step loop), and the offloaded
    layers in forward order, so that each layer's backward prefetches the input of the layer before it."""

    bytes: int = 0
    peak: int = 0
    _live: int = 0
    _layers: list[Any] = field(default_factory=list)  # the Functions' contexts, in forward order
    prefetched: int = 0  # inputs that were already on the device (or on their way) when their backward began

    def add(self, n: int) -> None:
        self.bytes += n
        self._live += n
        self.peak = max(self.peak, self._live)

    def release(self, n: int) -> None:
        self._live -= n

    def reset(self) -> None:
        self.bytes = self.peak = self._live = self.prefetched = 0
        self._layers.clear()

    def push(self, ctx: Any) -> None:
        ctx.fetched = None
        self._layers.append(ctx)

    def fetch(self, ctx: Any) -> torch.Tensor:
        """``ctx``'s input back on its device (prefetched by the layer after it, or copied now), and the
        prefetch of the previous layer's input on the side stream, so its copy runs under this layer's
        recompute and backward."""
        x = ctx.fetched if ctx.fetched is not None else _to_device(ctx.host, ctx.device)
        if ctx.fetched is not None:
            self.prefetched += 1
            _consume(x)
        i = next((j for j in range(len(self._layers) - 1, -1, -1) if self._layers[j] is ctx), -1)
        if i > 0:
            prev = self._layers[i - 1]
            if prev.fetched is None and prev.host is not None:
                prev.fetched = _prefetch(prev.host, prev.device)
        if i >= 0:
            del self._layers[i]
        ctx.fetched = None
        return x


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


def _prefetch(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Start ``host``'s copy to ``device``: on CUDA on the offload side stream (after the offload copy that
    filled it); on the CPU a copy now (the test path: exactness and byte counts)."""
    if device.type != "cuda":
        return host.clone()
    dev = device.index or 0
    stream = _STREAM.setdefault(dev, torch.cuda.Stream(device))
    with torch.cuda.stream(stream):
        return host.to(device, non_blocking=True)


def _consume(x: torch.Tensor) -> None:
    """Make the compute stream wait for a prefetched copy, and keep its memory until the compute stream is done."""
    if x.is_cuda:
        current = torch.cuda.current_stream(x.device)
        current.wait_stream(_STREAM[x.device.index or 0])
        x.record_stream(current)


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
        counter.push(ctx)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x = ctx.counter.fetch(ctx).requires_grad_(True)
        ctx.counter.release(ctx.nbytes)
        ctx.host = None
        with torch.enable_grad():
            out = ctx.run(x)
        grads = param_grads([out], [grad], [x], ctx.params)
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
