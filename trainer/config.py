"""Frozen trainer configs (Hydra twins are generated in :mod:`cli.schema`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from planner.types import SHARDINGS
from trainer.tasks.needle import NeedleConfig

PRECISIONS = ("auto", "bf16", "fp32")


SOURCE_KINDS = ("stdlib", "pydoc", "glob", "jsonl", "indexed")
TASKS = ("needle",)  # eval.tasks


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One source of a data mixture (``data.sources``) or of validation (``eval.sources``)."""

    name: str  # a label for logs, TensorBoard and checkpoints: letters, digits, '-', '_'
    source: str = "stdlib"  # stdlib | pydoc | glob | jsonl | indexed (see trainer.corpus)
    path: str | None = None  # glob pattern, .jsonl file, or indexed-dataset prefix (no .bin/.idx)
    text_field: str = "text"  # the JSONL field holding the text
    weight: float = 1.0  # share of the training tokens (weights are normalised over the sources)
    min_len: int = 0  # documents with fewer training tokens are skipped (counted)
    max_len: int = 0  # longer documents are split or rejected at this length (0: data.max_len at the step)

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name and all(c.isalnum() or c in "-_" for c in self.name)):
            raise ValueError(f"source name {self.name!r}; valid: a non-empty name of letters, digits, '-', '_'")
        if self.source not in SOURCE_KINDS:
            raise ValueError(f"source {self.name!r}: source={self.source!r}; valid: {list(SOURCE_KINDS)}")
        if self.source in ("glob", "jsonl", "indexed") and not self.path:
            raise ValueError(f"source {self.name!r} (source={self.source!r}) needs a path")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"source {self.name!r}: weight={self.weight!r}; valid: a finite number >= 0")
        _check_range(f"sources[{self.name}]", self, {"min_len": (0, None), "max_len": (0, None)}, integer=True)
        if self.max_len == 1 or (self.max_len and self.min_len > self.max_len):
            raise ValueError(f"source {self.name!r}: min_len={self.min_len}, max_len={self.max_len}; valid: "
                             "max_len 0 (data.max_len) or >= 2, and min_len <= max_len")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "stdlib"  # one source (when data.sources is empty): stdlib | pydoc | glob | jsonl | indexed
    path: str | None = None  # glob pattern, .jsonl file, or Megatron indexed-dataset prefix (no .bin/.idx)
    text_field: str = "text"  # the JSONL field holding the text
    sources: tuple[SourceConfig, ...] = ()  # a mixture: [{name, source, path, weight, min_len, max_len}, ...]
    tokenizer: str | None = None  # a tokenizers JSON file or a Hugging Face model folder; None = bytes (vocab 256)
    max_len: int = 4096  # longest training sequence (tokens); longer documents are split or rejected
    max_len_schedule: tuple[tuple[int, int], ...] = ()  # [[step, max_len], ...] from step 0; each <= max_len
    long_docs: str = "split"  # split | reject
    tokens_per_step: int = 32768  # training tokens per optimizer step (the global batch)
    seed: int = 0  # document order and mixture draws

    def __post_init__(self) -> None:
        srcs = _sources(self, "data")
        object.__setattr__(self, "max_len_schedule", tuple(tuple(e) for e in self.max_len_schedule))
        if self.source not in SOURCE_KINDS:
            raise ValueError(f"data.source={self.source!r}; valid: {list(SOURCE_KINDS)}")
        if self.long_docs not in ("split", "reject"):
            raise ValueError(f"data.long_docs={self.long_docs!r}; valid: 'split', 'reject'")
        if self.max_len < 2 or self.tokens_per_step < 2:
            raise ValueError(
                f"data.max_len and data.tokens_per_step must be >= 2, got {self.max_len}, {self.tokens_per_step}"
            )
        _check_range("data", self, {"seed": (0, None)}, integer=True)
        if srcs:
            if self.path is not None or self.source != "stdlib":
                raise ValueError(f"data.source={self.source!r}/data.path={self.path!r} name one source, and "
                                 "data.sources names several: give each source its own source and path")  # fmt: skip
            if not sum(s.weight for s in srcs) > 0:
                raise ValueError(f"data.sources: weights {[s.weight for s in srcs]} sum to "
                                 f"{sum(s.weight for s in srcs)}; valid: weights >= 0 summing to > 0")  # fmt: skip
        sched = self.max_len_schedule
        ok = all(len(e) == 2 and all(isinstance(v, int) for v in e) for e in sched)
        if not ok or (sched and sched[0][0] != 0) or any(a[0] >= b[0] for a, b in zip(sched, sched[1:])):
            raise ValueError(f"data.max_len_schedule={[list(e) for e in sched]}; valid: [[0, LEN], [STEP, LEN], "
                             "...] with increasing steps, the first at step 0")  # fmt: skip
        bad = [n for _, n in sched if not 2 <= n <= self.max_len]
        if bad:
            raise ValueError(
                f"data.max_len_schedule lengths {bad} are outside [2, data.max_len={self.max_len}] "
                "(data.max_len is the longest a run holds: the model and memory checks use it)"
            )

    def mixture(self) -> tuple[SourceConfig, ...]:
        """The sources to train on: ``data.sources``, or the one source of ``data.source``/``data.path``."""
        if self.sources:
            return self.sources
        return (SourceConfig(name=self.source, source=self.source, path=self.path, text_field=self.text_field),)

    def max_len_at(self, step: int) -> int:
        """The longest training sequence at ``step`` (``data.max_len_schedule``, else ``data.max_len``)."""
        at = [n for s, n in self.max_len_schedule if s <= step]
        return at[-1] if at else self.max_len


def _sources(cfg: DataConfig | EvalConfig, section: str) -> tuple[SourceConfig, ...]:
    """``cfg.sources`` typed and frozen in place (a stored config or a Python caller may give plain dicts),
    refused when two share a name."""
    srcs = tuple(s if isinstance(s, SourceConfig) else SourceConfig(**dict(s)) for s in cfg.sources)
    object.__setattr__(cfg, "sources", srcs)
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise ValueError(f"{section}.sources: names {names} repeat; valid: a distinct name per source")
    return srcs


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
    steps: int = 20  # optimizer steps of the run
    strategy: str = "adaptive"  # adaptive | ulysses | ring | hybrid | none (static, one group shape)
    sp_size: int = 0  # static strategies: GPUs per group (0 = the whole world; any size up to a node or whole nodes)
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-4  # learning rate at the end of the schedule
    warmup_steps: int = 2  # linear warmup from 0
    weight_decay: float = 0.01  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # Llama recipes: 0.95
    eps: float = 1e-8  # AdamW epsilon
    no_weight_decay: tuple[str, ...] = ()  # kinds trained without weight decay: norm, bias, embedding
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant, after warmup_steps
    decay_fraction: float = 0.1  # wsd: the last fraction of the steps decays linearly to min_lr
    grad_clip: float = 1.0  # gradient norm clip
    seed: int = 0  # weight initialisation
    out_dir: str = "runs/default"  # the run folder: checkpoints, TensorBoard, evaluation pictures
    log_every: int = 1  # TensorBoard scalars every N steps
    picture_every: int = 10  # plan picture every N steps (0 = never)
    checkpoint_every: int = 10  # checkpoint every N steps (0 = only at the end or on a stop signal)
    resume: bool = True  # resume from out_dir's latest checkpoint when there is one
    max_bad_steps: int = 3  # stop after this many non-finite losses in a row
    max_skipped_share: float = 0.05  # stop once steps with no trained target exceed this share of train.steps
    bucket_mb: float = 4.0  # replicate: gradient all-reduce bucket size, MB
    collective_timeout_s: float = 1800.0  # NCCL/gloo timeout: long enough for a million-token micro-step
    progress: bool = True  # a progress bar (false: one log line per step)
    sharding: str = "fsdp"  # fsdp (ZeRO-3, FSDP2) | replicate; sp-plan's memory model reads the same field
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 (fp32 master shards) | fp32
    plan_timeout_s: float = 60.0  # the next step's plan is late beyond this: use the greedy plan instead
    memory_every: int = 0  # count bytes saved for backward every N steps (0 = never; costs a little time)
    init_from: str | None = None  # hf:DIR (Hugging Face weights) or RUN_DIR (weights of one of our runs); None: random
    async_checkpoint: bool = False  # torch DCP async save: the step loop goes on while a checkpoint is written
    preempt_warning_s: float = 90.0  # seconds of warning a stop signal gives (sbatch --signal=B:USR1@N): N
    kernel: str = "auto"  # attention kernel: auto (CPU: cpu_fused; CUDA: the fastest exact fused one) or a name
    allow_unexpected_weights: bool = False  # hf:DIR may hold tensors the model does not use (ignored, not loaded)

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
        from sp.kernels import KERNELS

        kernels = ("auto", *KERNELS, "ring_flash")
        if self.kernel not in kernels:
            raise ValueError(f"train.kernel={self.kernel!r}; valid: {list(kernels)}")
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
        if not 0 <= self.max_skipped_share < 1:
            raise ValueError(f"train.max_skipped_share={self.max_skipped_share}; valid: a share in [0, 1)")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}; valid: 0 <= min_lr <= lr")
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
    sources: tuple[SourceConfig, ...] = ()  # validation-only sources (their first max_docs documents each)
    tasks: tuple[str, ...] = ()  # evaluation tasks run with it: needle (retrieval by length and depth)
    needle: NeedleConfig = field(default_factory=NeedleConfig)  # eval.needle.*: the needle task's grid

    def __post_init__(self) -> None:
        srcs = _sources(self, "eval")
        _check_range("eval", self, {"every": (0, None), "max_docs": (1, None), "tokens_per_step": (0, None)},
                     integer=True)  # fmt: skip
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise ValueError(f"eval.holdout={self.holdout!r}; valid: a fraction in [0, 1)")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.needle, dict):  # from a flat config (a checkpoint's config.json)
            object.__setattr__(self, "needle", NeedleConfig(**self.needle))
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"eval.tasks={list(self.tasks)}; valid: {list(TASKS)}")
        if self.tasks and not self.every:
            raise ValueError(f"eval.tasks={list(self.tasks)} run at each evaluation: set eval.every (e.g. 20)")
        if self.every and not (self.holdout or srcs):
            raise ValueError(
                f"eval.every={self.every} needs documents to evaluate: set eval.holdout (e.g. 0.01) or eval.sources"
            )
