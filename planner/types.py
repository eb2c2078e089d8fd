"""Frozen plan and hardware types. Pure data: no torch.distributed, no hydra."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CHECKPOINTING = ("full", "selective", "none")  # activation checkpointing modes (trainer.sharding)
SHARDINGS = ("fsdp", "replicate")  # fsdp: ZeRO-3 (states / world); replicate: whole states on every GPU


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """A GPU cluster profile. Compute: either fitted FlexSP-form constants (``alpha1_ms``, ``alpha2_ms``:
    ``t = (alpha1 L^2 + alpha2 L) / P`` ms per sequence) or peak FLOP/s times ``mfu`` applied to the model's
    FLOPs. Communication: per-GPU all-to-all bandwidth per group size (``a2a_gbs``) when measured, else
    ``intra_gbs`` / ``inter_gbs`` by whether the group stays inside a node."""

    name: str = "custom"
    nodes: int = 1
    gpus_per_node: int = 8
    peak_tflops: float = 312.0
    mfu: float = 0.45
    memory_gib: float = 80.0  # usable per GPU
    intra_gbs: float = 150.0
    inter_gbs: float = 12.5
    intra_latency_us: float = 10.0
    inter_latency_us: float = 30.0
    a2a_gbs: dict[int, float] = field(default_factory=dict)
    p2p_gbs: dict[int, float] = field(default_factory=dict)
    alpha1_ms: float | None = None
    alpha2_ms: float | None = None
    beta_ms: float = 0.0  # fixed cost of one group's micro-step (launch, optimizer share, ...)
    act_bytes_per_token: float | None = None  # measured activation bytes per token per layer stack
    comm_gib_per_group: float = 0.0  # NCCL buffers per communicator a rank belongs to (CostModel.comm_gib)
    usd_per_gpu_hour: float | None = None  # price, for sp-plan's run-cost estimate

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("peak_tflops", "memory_gib", "intra_gbs", "inter_gbs", "mfu"):
            if getattr(self, name) <= 0:
                raise ValueError(f"cluster.{name} must be > 0, got {getattr(self, name)}")
        if self.comm_gib_per_group < 0:
            raise ValueError(f"cluster.comm_gib_per_group must be >= 0, got {self.comm_gib_per_group}")
        if self.usd_per_gpu_hour is not None and self.usd_per_gpu_hour < 0:
            raise ValueError(f"cluster.usd_per_gpu_hour must be >= 0 (or null), got {self.usd_per_gpu_hour}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    name: str = "custom"
    layers: int
    hidden: int
    heads: int
    kv_heads: int | None = None
    head_dim: int | None = None
    ffn: int | None = None
    vocab: int = 32000
    swiglu: bool = True
    checkpointing: str = "full"  # "full" | "selective" | "none"
    bytes_per_value: int = 2  # bf16 activations and communication

    def __post_init__(self) -> None:
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing={self.checkpointing!r}; valid: 'full', 'selective', 'none'")
        if self.heads % self.n_kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.n_kv_heads})")

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def d_ffn(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def linear_params(self) -> int:
        attn = self.hidden * self.d_head * (2 * self.heads + 2 * self.n_kv_heads)
        mlp = (3 if self.swiglu else 2) * self.hidden * self.d_ffn
        return self.layers * (attn + mlp)

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Every parameter's shape, in the Megatron GPT's order (local spec, RMSNorm, untied output layer)."""
        h, d = self.hidden, self.d_head
        layer = [
            (h,),  # input_layernorm
            ((self.heads + 2 * self.n_kv_heads) * d, h),  # linear_qkv
            (h, self.heads * d),  # linear_proj
            (h,),  # pre_mlp_layernorm
            ((2 if self.swiglu else 1) * self.d_ffn, h),  # linear_fc1
            (h, self.d_ffn),  # linear_fc2
        ]
        return [(self.vocab, h), *layer * self.layers, (h,), (self.vocab, h)]

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes())

    def ulysses_degrees(self, limit: int) -> list[int]:
        """Ulysses degrees (powers of two <= limit) the heads allow (kv heads replicate past their count)."""
        out, u = [], 1
        while u <= limit:
            if self.heads % u == 0 and (self.n_kv_heads % u == 0 or u % self.n_kv_heads == 0):
                out.append(u)
            u *= 2
        return out


@dataclass(frozen=True)
class GroupShape:
    """An SP group of ``ulysses x ring`` GPUs."""

    ulysses: int = 1
    ring: int = 1

    @property
    def size(self) -> int:
        return self.ulysses * self.ring

    @property
    def strategy(self) -> str:
        if self.size == 1:
            return "none"
        if self.ring == 1:
            return "ulysses"
        return "ring" if self.ulysses == 1 else "hybrid"

    def __str__(self) -> str:
        return f"{self.strategy}(u={self.ulysses},r={self.ring})"


@dataclass(frozen=True)
class Assignment:
    """One SP group of a micro-step: its aligned rank range, shape, and the sequences (indices) it runs."""

    first_rank: int
    shape: GroupShape
    seqs: tuple[int, ...]
    time_s: float
    memory_gib: float

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(range(self.first_rank, self.first_rank + self.shape.size))


@dataclass(frozen=True)
class MicroStep:
    groups: tuple[Assignment, ...]
    lower_bound_s: float
    checkpointing: str = ""  # the activation checkpointing this micro-step runs with ("": the model's)

    @property
    def time_s(self) -> float:
        return max(g.time_s for g in self.groups)


@dataclass(frozen=True)
class StepPlan:
    """A step: micro-steps run one after the other; step time = sum of their slowest groups.

    ``step_bound_s``: a lower bound on the best possible step over every micro-step split
    (:func:`planner.bounds.step_bound`); ``split_bound_s`` only bounds plans on this plan's split."""

    lengths: tuple[int, ...]
    micro_steps: tuple[MicroStep, ...]
    solve_s: float
    method: str
    step_bound_s: float | None = None
    split: str = ""  # which split family won (contiguous | balanced | mixed), "" when not searched
    splits_tried: int = 0

    @property
    def time_s(self) -> float:
        return sum(m.time_s for m in self.micro_steps)

    @property
    def split_bound_s(self) -> float:
        return sum(m.lower_bound_s for m in self.micro_steps)

    @property
    def lower_bound_s(self) -> float:
        return self.step_bound_s if self.step_bound_s is not None else self.split_bound_s

    @property
    def gap(self) -> float:
        return max(0.0, (self.time_s - self.lower_bound_s) / self.time_s) if self.time_s > 0 else 0.0

    @property
    def peak_memory_gib(self) -> float:
        return max(g.memory_gib for m in self.micro_steps for g in m.groups)

    def peak_group(self) -> tuple[MicroStep, Assignment]:
        """The micro-step and group with the most memory per GPU."""
        return max(((m, g) for m in self.micro_steps for g in m.groups), key=lambda mg: mg[1].memory_gib)
