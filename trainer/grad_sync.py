"""Bucketed gradient all-reduce over the whole world, started during the last backward.

Each rank's loss is its tokens' loss sum divided by the step's global token count, so the exact gradient is
the SUM over ranks. Buckets (reverse parameter order, ~``bucket_mb`` each) launch asynchronously as soon as
all their gradients are final, strictly in bucket order so that every rank issues the same collectives in the
same order. A rank with nothing to run in the last micro-step launches all buckets right away.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class GradSync:
    def __init__(self, params: list[torch.nn.Parameter], bucket_mb: float = 4.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in reversed(self.params):
            if size and size + p.numel() * p.element_size() > bucket_mb * 2**20:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._armed = False
        self._ready = [0] * len(self.buckets)
        self._launched = 0
        self._works: list[tuple[dist.Work, torch.Tensor, list[torch.nn.Parameter]]] = []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def arm(self) -> None:
        """Call before the step's last backward: buckets launch as they complete."""
        self._armed = True
        self._ready = [0] * len(self.buckets)
        self._launched = 0
        self._works = []

    def _hook(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        while self._launched < len(self.buckets) and self._ready[self._launched] == len(self.buckets[self._launched]):
            self._launch(self._launched)

    def _launch(self, i: int) -> None:
        ps = self.buckets[i]
        flat = torch.cat([_grad(p).reshape(-1) for p in ps])  # [bucket numel]
        self._works.append((dist.all_reduce(flat, async_op=True), flat, ps))
        self._launched += 1

    def finish(self) -> None:
        """Launch what is left (all of it on a rank idle in the last micro-step) and write the sums back."""
        while self._launched < len(self.buckets):
            self._launch(self._launched)
        for work, flat, ps in self._works:
            work.wait()
            off = 0
            for p in ps:
                n = p.numel()
                _grad(p).copy_(flat[off : off + n].view_as(p))  # [numel] -view-> parameter shape
                off += n
        self._armed = False


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad
