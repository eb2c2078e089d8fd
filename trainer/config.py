"""Frozen trainer configs (Hydra twins are generated in :mod:`cli.schema`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.types import SHARDINGS

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "stdlib"  # stdlib | glob | jsonl | indexed
    path: str | None = None  # glob pattern, .jsonl file, or Megatron indexed-dataset prefix (no .bin/.idx)
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizers JSON file or a Hugging Face model folder; None = bytes (vocab 256)
    max_len: int = 4096  # longest training sequence (tokens); longer documents are split or rejected
    long_docs: str = "split"  # split | reject
    tokens_per_step: int = 32768
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in ("stdlib", "glob", "jsonl", "indexed"):
            raise ValueError(f"data.source={self.source!r}; valid: 'stdlib', 'glob', 'jsonl', 'indexed'")
        if self.long_docs not in ("split", "reject"):
            raise ValueError(f"data.long_docs={self.long_docs!r}; valid: 'split', 'reject'")
        if self.max_len < 2 or self.tokens_per_step < 2:
            raise ValueError(
                f"data.max_len and data.tokens_per_step must be >= 2, got {self.max_len}, {self.tokens_per_step}"
            )
        _check_range("data", self, {"seed": (0, None)}, integer=True)


def _check_range(section: str, cfg: object, bounds: dict[str, tuple[float, float | None]], integer: bool = False,
                 strict: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Each field is a finite number in [lo, hi] (> lo for the ``strict`` ones); the message names the
    field, the value and the valid range."""
    for name, (lo, hi) in bounds.items():
        v = getattr(cfg, name)
        kind = "an integer" if integer else "a finite number"
        ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
        ok = ok and (v > lo if name in strict else v >= lo) and (hi is None or v <= hi)
        if not ok:
            rng = f"{'>' if name in strict else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ValueError(f"{section}.{name}={v!r}; valid: {kind} {rng}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 20
    strategy: str = "adaptive"  # adaptive | ulysses | ring | hybrid | none (static, one group shape)
    sp_size: int = 0  # static strategies: GPUs per group (0 = the whole world)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999  # Llama recipes: 0.95
    eps: float = 1e-8
    no_weight_decay: tuple[str, ...] = ()  # kinds trained without weight decay: norm, bias, embedding
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant, after warmup_steps
    decay_fraction: float = 0.1  # wsd: the last fraction of the steps decays linearly to min_lr
    grad_clip: float = 1.0
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 1
    picture_every: int = 10
    checkpoint_every: int = 10
    resume: bool = True
    max_bad_steps: int = 3  # stop after this many non-finite losses in a row
    bucket_mb: float = 4.0
    collective_timeout_s: float = 1800.0  # NCCL/gloo timeout: long enough for a million-token micro-step
    progress: bool = True
    sharding: str = "fsdp"  # fsdp (ZeRO-3, FSDP2) | replicate; sp-plan's memory model reads the same field
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 (fp32 master shards) | fp32
    plan_timeout_s: float = 60.0  # the next step's plan is late beyond this: use the greedy plan instead
    memory_every: int = 0  # count bytes saved for backward every N steps (0 = never; costs a little time)
    init_from: str | None = None  # hf:DIR (Hugging Face weights) or RUN_DIR (weights of one of our runs); None: random
    async_checkpoint: bool = False  # torch DCP async save: the step loop goes on while a checkpoint is written
    preempt_warning_s: float = 90.0  # seconds of warning a stop signal gives (sbatch --signal=B:USR1@N): N

    def __post_init__(self) -> None:
        valid = ("adaptive", "ulysses", "ring", "hybrid", "none")
        if self.strategy not in valid:
            raise ValueError(f"train.strategy={self.strategy!r}; valid: {list(valid)}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"train.sharding={self.sharding!r}; valid: {list(SHARDINGS)}")
        from trainer.optim import NO_DECAY_KINDS, SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r}; valid: {list(SCHEDULES)}")
        bad = [k for k in self.no_weight_decay if k not in NO_DECAY_KINDS]
        if bad:
            raise ValueError(f"train.no_weight_decay={list(self.no_weight_decay)}: unknown {bad}; valid: "
                             f"any of {list(NO_DECAY_KINDS)}")  # fmt: skip
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not (isinstance(b, (int, float)) and 0 <= b < 1):
                raise ValueError(f"train.{name}={b!r}; valid: a number in [0, 1)")
        if not (isinstance(self.decay_fraction, (int, float)) and 0 < self.decay_fraction <= 1):
            raise ValueError(f"train.decay_fraction={self.decay_fraction!r}; valid: a number in (0, 1]")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}; valid: {list(PRECISIONS)}")
        if not self.plan_timeout_s > 0:
            raise ValueError(f"train.plan_timeout_s={self.plan_timeout_s}; valid: a number of seconds > 0")
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError("train.init_from=''; valid: null (random), hf:DIR or the folder of one of our runs")
        if self.memory_every < 0:
            raise ValueError(f"train.memory_every={self.memory_every}; valid: 0 (off) or a step count >= 1")
        _check_range("train", self, {
            "steps": (1, None), "log_every": (1, None), "max_bad_steps": (1, None), "warmup_steps": (0, None),
            "checkpoint_every": (0, None), "picture_every": (0, None), "sp_size": (0, None),
        }, integer=True)  # fmt: skip
        _check_range("train", self, {"grad_clip": (0, None), "lr": (0, None), "min_lr": (0, None),
                                     "weight_decay": (0, None), "bucket_mb": (0, None), "eps": (0, None),
                                     "collective_timeout_s": (0, None), "preempt_warning_s": (0, None)},
                     strict=("grad_clip", "lr", "bucket_mb", "preempt_warning_s", "collective_timeout_s",
                             "eps"))  # fmt: skip
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}; valid: 0 <= min_lr <= lr")
        if self.sp_size and self.sp_size & (self.sp_size - 1):
            raise ValueError(f"train.sp_size={self.sp_size}; valid: 0 (the whole world) or a power of two")
        if self.strategy == "hybrid" and 0 < self.sp_size < 4:
            raise ValueError(
                f"train.strategy='hybrid' needs train.sp_size >= 4 (u=2 x r>=2), got {self.sp_size}; "
                "use strategy='ring' or 'ulysses' for 2 GPUs per group"
            )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Validation on held-out documents (never trained on), forward only, under the planner's plans."""

    every: int = 0  # evaluate every N steps and after the last one (0 = never)
    holdout: float = 0.0  # fraction of the training corpus's documents held out for it (chosen by data.seed)
    max_docs: int = 64  # held-out documents evaluated each time (the first ones, in a fixed order)
    tokens_per_step: int = 0  # tokens per evaluation step (0 = data.tokens_per_step)

    def __post_init__(self) -> None:
        _check_range("eval", self, {"every": (0, None), "max_docs": (1, None), "tokens_per_step": (0, None)},
                     integer=True)  # fmt: skip
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise ValueError(f"eval.holdout={self.holdout!r}; valid: a fraction in [0, 1)")
        if self.every and not self.holdout:
            raise ValueError(f"eval.every={self.every} needs held-out documents: set eval.holdout (e.g. 0.01)")
