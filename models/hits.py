"""Which targets the model gets right: the argmax of each position's logits against its label, recorded beside
the per-token loss (teacher-forced retrieval scoring, :mod:`trainer.tasks.scoring`).

:func:`hits_recorded` wraps a Megatron ``GPTModel``'s ``compute_language_model_loss`` for the passes inside it:
each call appends a bool ``[b, s]`` tensor (argmax == label) to the yielded list. With the chunked loss
(:mod:`models.loss`) the "logits" handed to the loss are the hidden states: the argmax is then taken chunk by
chunk with the output weight, so no ``[tokens, vocab]`` tensor lives beyond one chunk. Forward only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

HIT_CHUNK = 4096  # tokens per argmax chunk on the chunked-loss path


@contextlib.contextmanager
def hits_recorded(model: torch.nn.Module, into: list[torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Record the hits of the passes inside (appended to ``into`` when given, else to a new list; yielded)."""
    gpt: Any = getattr(model, "module", model)
    own = "compute_language_model_loss" in vars(gpt)  # models.loss.install sets it on the instance
    inner = gpt.compute_language_model_loss
    hits: list[torch.Tensor] = [] if into is None else into

    def scored(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        loss = inner(labels, logits)
        with torch.no_grad():
            hits.append(_hits(gpt, labels, logits))
        return loss

    gpt.compute_language_model_loss = scored
    try:
        yield hits
    finally:
        if own:
            gpt.compute_language_model_loss = inner
        else:
            del gpt.compute_language_model_loss


def _hits(gpt: Any, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """labels [b, s], logits [s, b, V] (or hidden [s, b, h] under the chunked loss) -> bool [b, s]."""
    if getattr(gpt, "sp_loss_chunk", 0):
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else (
            gpt.output_layer.weight)  # fmt: skip
        s, b, h = logits.shape
        flat = logits.transpose(0, 1).reshape(b * s, h)  # [s, b, h] -transpose-> [b, s, h] -reshape-> [b s, h]
        best = torch.cat([(flat[a : a + HIT_CHUNK] @ weight.T).argmax(-1) for a in range(0, b * s, HIT_CHUNK)])
        return best.view(b, s) == labels  # [b s] -view-> [b, s]
    return logits.argmax(-1).transpose(0, 1) == labels  # [s, b, V] -argmax-> [s, b] -transpose-> [b, s]
