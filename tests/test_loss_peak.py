"""The chunked loss's backward: its vocabulary-sized peak is the memory model's (fp32 accumulator in place, no
per-chunk ``[V, h]`` temporary), measured by tracking every tensor the ops create; gradients stay exact."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class VocabBytes(TorchDispatchMode):
    """Live bytes of tensors with a dimension of size ``vocab`` created by ops while active (each storage once,
    released when the last tensor object holding it is collected), and their peak."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.live, self.peak, self.big = vocab, 0, 0, []
        self._held: dict[int, int] = {}  # storage pointer -> tensor objects holding it

    def _release(self, ptr: int, nbytes: int) -> None:
        self._held[ptr] -= 1
        if not self._held[ptr]:
            del self._held[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view's storage is its base's
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if ptr not in self._held:
                    self._held[ptr] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    self.big.append((str(func), tuple(t.shape), t.dtype))
                self._held[ptr] += 1
                weakref.finalize(t, self._release, ptr, nbytes)
        return out


@pytest.mark.parametrize("dtype, b", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_chunked_loss_backward_peak_is_the_models(dtype, b):
    from models.loss import ChunkedLinearCrossEntropy
    from planner.cost import CostModel
    from planner.types import Cluster, ModelShape

    tokens, chunk, vocab, hidden = 96, 32, 500, 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    loss = ChunkedLinearCrossEntropy.apply(h, w, labels, chunk)
    meter = VocabBytes(vocab)
    with meter:
        loss.sum().backward()
    shape = ModelShape(name="t", layers=1, hidden=hidden, heads=1, kv_heads=1, head_dim=16, ffn=32, vocab=vocab,
                       bytes_per_value=b, loss_chunk_tokens=chunk)  # fmt: skip
    predicted = CostModel(Cluster(name="cpu"), shape).fixed_working_bytes()
    assert meter.peak == predicted, (meter.peak, predicted, meter.big)
    # no [V, h] tensor but the fp32 accumulator and (half precision) the gradient's final cast
    vh = [s for _, s, _ in meter.big if s == (vocab, hidden)]
    assert len(vh) == (2 if b < 4 else 1), meter.big
    # exact: the float64 loss's gradients
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    torch.nn.functional.cross_entropy(h64 @ w64.T, labels, reduction="sum").backward()
    tol = 1e-9 if dtype == torch.float32 else 3e-2
    for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < max(tol, 1e-6), dtype
