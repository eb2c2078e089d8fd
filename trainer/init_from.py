"""Where a run's first weights come from (``train.init_from``), decided and checked before anything is
built or written:

- ``None``: random, every rank initialising only its own rows (:mod:`models.init`);
- ``hf:DIR``: a Hugging Face folder, every rank reading only its own rows (:mod:`models.hf.load`);
- ``RUN_DIR`` (or one of its ``checkpoints/step_N`` folders): the weights of one of our runs, and nothing
  else (no optimiser state, step or data position), so a new stage can change its data, lengths, rope
  settings and optimiser: ProLong's 64K -> 512K staging. The architecture must match.

A run folder that already holds checkpoints resumes from its own instead (``init_from`` is then unused).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from planner.types import ModelShape
from trainer import checkpoint

ARCHITECTURE = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "swiglu", "qkv_bias", "qk_norm",
                "tie_embeddings")  # fmt: skip


@dataclass(frozen=True)
class Source:
    kind: str  # random | hf | run
    path: Path | None = None  # the HF folder, or the run checkpoint's folder

    def describe(self) -> str:
        return "random initialisation" if self.kind == "random" else f"{self.kind} weights from {self.path}"


def source(init_from: str | None, shape: ModelShape, allow_unexpected: bool = False) -> Source:
    """The validated source (errors name the folder, the file and the field; a Hugging Face folder's tensors
    must match the model exactly, extra ones only with ``allow_unexpected``)."""
    if init_from is None:
        return Source("random")
    if init_from.startswith("hf:"):
        from models.hf.load import check

        folder = Path(init_from[3:])
        if not folder.is_dir():
            raise ValueError(f"train.init_from={init_from!r}: {folder} is not a folder")
        check(folder, shape, allow_unexpected)
        return Source("hf", folder)
    folder = Path(init_from)
    ck = _run_checkpoint(folder)
    stored = checkpoint.stored_config(ck)
    diffs = [f"model.{k}: {stored.get(f'model.{k}')!r} (in {ck}) vs {getattr(shape, k)!r}" for k in ARCHITECTURE
             if f"model.{k}" in stored and stored[f"model.{k}"] != getattr(shape, k)]  # fmt: skip
    if diffs:
        raise ValueError(f"train.init_from={init_from!r} holds another architecture: " + "; ".join(diffs))
    return Source("run", ck)


def _run_checkpoint(folder: Path) -> Path:
    if (folder / checkpoint.MANIFEST).is_file():  # a checkpoint folder itself
        problem = checkpoint.verify(folder)
        if problem is not None:
            raise ValueError(f"train.init_from={str(folder)!r}: {problem}")
        return folder
    ck, _ = checkpoint.newest_intact(str(folder))
    if ck is None:
        raise ValueError(f"train.init_from={str(folder)!r}: no intact checkpoint in {folder / 'checkpoints'} "
                         "(valid: hf:DIR, a run folder with checkpoints, or a checkpoints/step_N folder)")  # fmt: skip
    return ck


def initialise(model: torch.nn.Module, src: Source, shape: ModelShape, seed: int) -> None:
    """Fill this rank's rows of every parameter from ``src`` (collective for ``run``: DCP)."""
    if src.kind == "random":
        from models.init import init_random

        init_random(model, seed, shape.layers)
    elif src.kind == "hf":
        from models.hf.load import load_into

        assert src.path is not None
        load_into(model, src.path, shape)
    else:
        assert src.path is not None
        checkpoint.load_weights(src.path, model)
