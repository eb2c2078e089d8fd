"""Chunked linear cross-entropy: the output projection and the loss, one token chunk at a time.

The plain path materialises ``[tokens, vocab]`` logits (bf16, plus an fp32 copy and the softmax: about
10 bytes per token per vocabulary entry, 19.6 GiB at 16K local tokens of Llama-3's 128K vocabulary) and keeps
the fp32 softmax for backward. Here the forward computes each chunk's logits, its log-sum-exp and the target
logit, and keeps only ``hidden`` (already saved by the layer below) and the fp32 lse per token; the backward
recomputes each chunk's logits, forms ``softmax - onehot`` scaled by the incoming gradient (in place, in
fp32), and accumulates ``d hidden`` and, in place, ``d weight`` in fp32 (no per-chunk ``[V, h]`` temporary).
No ``[tokens, vocab]`` tensor lives beyond one chunk. The backward's vocabulary-sized peak is the fp32
accumulator (``4 V h``) plus the larger of one chunk's fp32 gradient with its compute-dtype copy
(``chunk V (4 + b)``) and the accumulator's final cast to the weight's dtype (``b V h``):
:meth:`planner.cost.CostModel.fixed_working_bytes` counts exactly that. The extra cost is
one more logits matmul per token (the recompute), 2 V h FLOPs. Numerics: logits and their reductions in
fp32, like Megatron's ``vocab_parallel_cross_entropy`` (equal within 1e-6 in fp32; tested).

Installed on a Megatron ``GPTModel`` by :func:`install`: the output layer then hands the hidden states
through and the model's ``compute_language_model_loss`` computes the chunked loss with the output weight (the
embedding when tied), so parameter names, FSDP units and checkpoints are unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``loss[t] = logsumexp(hidden[t] @ W.T) - (hidden[t] @ W.T)[labels[t]]``; hidden ``[T, h]``, W ``[V, h]``,
    labels ``[T]`` -> loss ``[T]`` (fp32)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk):
            logits = (hidden[a : a + chunk] @ weight.T).float()  # [chunk, V]: the only vocab-sized tensor
            lse[a : a + chunk] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, labels[a : a + chunk, None])[:, 0]
            loss[a : a + chunk] = lse[a : a + chunk] - target
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # the fp32 accumulator
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            h = hidden[a : a + chunk]
            p = (h @ weight.T).float()  # [chunk, V]: the logits (b) live only until this fp32 copy exists
            p.sub_(lse[a : a + chunk, None]).exp_()  # the softmax, in place
            p[rows[: h.shape[0]], labels[a : a + chunk]] -= 1.0  # d loss / d logits = softmax - onehot
            p.mul_(grad[a : a + chunk, None].float())
            g = p.to(hidden.dtype)  # p itself in fp32
            d_hidden[a : a + chunk] = g @ weight
            _accumulate(d_weight, g, p, h)
            del p, g
        return d_hidden, d_weight.to(weight.dtype), None, None


def _accumulate(acc: torch.Tensor, g: torch.Tensor, p: torch.Tensor, h: torch.Tensor) -> None:
    """``acc += g.T @ h`` in place in fp32, with no ``[V, h]`` temporary: on CUDA one half-precision GEMM that
    accumulates in fp32 into ``acc`` (``addmm`` with ``out_dtype``); elsewhere, or for fp32 inputs, an fp32
    GEMM of the fp32 gradient ``p`` into ``acc`` (``h`` widened: ``[chunk, h]``, small)."""
    if g.is_cuda and g.dtype != torch.float32:
        torch.addmm(acc, g.T, h, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(p.T, h.float())


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token loss for hidden ``[s, b, h]`` and labels ``[b, s]`` -> ``[b, s]`` (Megatron's layouts)."""
    s, b, h = hidden.shape
    # [s, b, h] -transpose-> [b, s, h] -reshape-> [b s, h]; labels [b, s] -reshape-> [b s]
    flat = hidden.transpose(0, 1).reshape(b * s, h)
    loss = ChunkedLinearCrossEntropy.apply(flat, weight, labels.reshape(b * s), chunk)
    return loss.view(b, s)  # [b s] -view-> [b, s]


def install(model: torch.nn.Module, chunk: int) -> None:
    """Make a Megatron GPTModel compute its loss in chunks of ``chunk`` tokens (``model.loss_chunk_tokens``).
    :func:`set_chunk` changes the chunk between passes (0: the plain output layer and loss), so the planner
    can choose it per micro-step; a pass keeps the chunk it started with for its backward."""
    gpt: Any = model
    out_layer = gpt.output_layer
    gpt.sp_loss_chunk = gpt.sp_loss_chunk_default = chunk
    plain_output, plain_loss = out_layer.forward, gpt.compute_language_model_loss

    def passthrough(self: Any, hidden: torch.Tensor, weight: torch.Tensor | None = None, **kw: Any) -> tuple:
        if not gpt.sp_loss_chunk:
            return plain_output(hidden, weight=weight, **kw)
        return hidden, None  # the "logits" are the hidden states: the loss below projects them chunk by chunk

    def loss(self: Any, labels: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if not gpt.sp_loss_chunk:
            return plain_loss(labels, hidden)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else (
            self.output_layer.weight)  # fmt: skip
        return chunked_loss(hidden, weight, labels, gpt.sp_loss_chunk)

    forward = gpt.forward

    def losses_only(*args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels", args[4] if len(args) > 4 else None)  # GPTModel.forward's 5th parameter
        if labels is None and gpt.sp_loss_chunk:
            raise ValueError(
                f"model.loss_chunk_tokens={gpt.sp_loss_chunk}: the model returns per-token losses only; pass labels"
            )
        return forward(*args, **kwargs)

    out_layer.forward = types.MethodType(passthrough, out_layer)
    gpt.compute_language_model_loss = types.MethodType(loss, gpt)
    gpt.forward = losses_only


def set_chunk(model: torch.nn.Module, chunk: int | None) -> None:
    """The loss chunk of the next passes (None: the one installed; 0: the plain loss). Raises where the
    model was built without the chunked loss and ``chunk`` asks for it."""
    target = getattr(model, "module", model)  # under FSDP2 the model itself; a wrapper's module otherwise
    if not hasattr(target, "sp_loss_chunk"):
        if chunk:
            raise ValueError(f"the plan asks for loss_chunk_tokens={chunk}; the model was built without the chunked "
                             "loss (set model.loss_chunk_tokens or planner.loss_chunk_tokens)")  # fmt: skip
        return
    target.sp_loss_chunk = target.sp_loss_chunk_default if chunk is None else chunk
