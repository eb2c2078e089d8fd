"""Frozen plan and hardware types. Pure data: no torch.distributed, no hydra."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

CHECKPOINTING = ("full", "selective", "none", "offload")  # activation checkpointing modes (trainer.sharding);
# offload = full checkpointing with each layer's kept input in host memory (trainer.offload)
SHARDINGS = ("fsdp", "replicate")  # fsdp: ZeRO-3 (states / world); replicate: whole states on every GPU
NORM_TILE_TOKENS = 4096  # models.rms_norm runs its fp32 temporaries over tiles of this many tokens


# transformers' rope_scaling keys per rope type (the rope_type key itself aside); the values are computed
# exactly as transformers computes them (models/rope.py). Other types (dynamic, longrope, ...) are refused.
ROPE_KEYS: dict[str, dict[str, bool]] = {  # key -> required
    "default": {},
    "linear": {"factor": True},
    "llama3": {"factor": True, "low_freq_factor": True, "high_freq_factor": True,
               "original_max_position_embeddings": True},
    "yarn": {"factor": False, "original_max_position_embeddings": True, "beta_fast": False, "beta_slow": False,
             "attention_factor": False, "mscale": False, "mscale_all_dim": False, "truncate": False},
}  # fmt: skip


def check_rope_scaling(scaling: dict[str, Any] | None, where: str = "model.rope_scaling") -> None:
    """A clear error for an unknown rope type, an unknown key or a missing one, naming the valid ones."""
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_KEYS:
        raise ValueError(f"{where}.rope_type={kind!r}; valid: {sorted(ROPE_KEYS)}")
    keys = ROPE_KEYS[kind]
    unknown = sorted(set(scaling) - set(keys) - {"rope_type", "type", "rope_theta"})
    if unknown:
        raise ValueError(f"{where} has keys {unknown} that rope_type {kind!r} does not take; valid: {sorted(keys)}")
    missing = sorted(k for k, req in keys.items() if req and scaling.get(k) is None)
    if missing:
        raise ValueError(f"{where} (rope_type {kind!r}) needs {missing}")


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """A GPU cluster profile. Compute: either fitted FlexSP-form constants (``alpha1_ms``, ``alpha2_ms``:
    ``t = (alpha1 L^2 + alpha2 L) / P`` ms per sequence) or peak FLOP/s times ``mfu`` applied to the model's
    FLOPs. Communication: per-GPU all-to-all bandwidth per group size (``a2a_gbs``) when measured, else
    ``intra_gbs`` / ``inter_gbs`` by whether the group stays inside a node."""

    name: str = "custom"  # the profile's name (logs, calibration files)
    nodes: int = 1  # nodes in the cluster (sp-train: from the launch)
    gpus_per_node: int = 8  # GPUs per node (sp-train: from the launch; groups stay in a node or span whole nodes)
    peak_tflops: float = 312.0  # dense bf16 peak per GPU, TFLOP/s
    mfu: float = 0.45  # the GEMMs' share of peak (projections, MLP, logits)
    memory_gib: float = 80.0  # usable per GPU
    intra_gbs: float = 150.0  # per-GPU bandwidth inside a node, GB/s
    inter_gbs: float = 12.5  # per-GPU bandwidth between nodes, GB/s
    intra_latency_us: float = 10.0  # per collective inside a node, microseconds
    inter_latency_us: float = 30.0  # per collective across nodes, microseconds
    a2a_gbs: dict[int, float] = field(default_factory=dict)  # measured all-to-all GB/s per group size (sp-profile)
    p2p_gbs: dict[int, float] = field(default_factory=dict)  # measured ring P2P GB/s per group size (sp-profile)
    alpha1_ms: float | None = None  # fitted attention constant (FlexSP form): ms per token^2 / P
    alpha2_ms: float | None = None  # fitted linear constant (FlexSP form): ms per token / P
    beta_ms: float = 0.0  # fixed cost of one group's micro-step (launch, optimizer share, ...)
    act_bytes_per_token: float | None = None  # measured activation bytes per token per layer stack
    comm_gib_per_group: float = 0.0  # NCCL buffers per communicator a rank belongs to (CostModel.comm_gib)
    max_communicators: int = 12  # process groups the trainer keeps per rank (least recently used destroyed past it)
    usd_per_gpu_hour: float | None = None  # price, for sp-plan's run-cost estimate
    fsdp_prefetch_layers: int = 1  # layers FSDP2 all-gathers ahead (implicit backward prefetch on CUDA)
    host_gbps: float = 25.0  # host <-> GPU copy bandwidth per GPU (activation offload; PCIe Gen5 x16 shared)
    host_memory_gib: float = 1536.0  # host memory per node usable for offloaded activations and states
    cpu_adam_gparams_per_s: float = 2.5  # AdamW on the host, per GPU's share of the CPUs (state offload)
    ring_overlap: float = 1.0  # share of a ring step's attention compute that hides its K/V transfer (fitted)
    fsdp_overlap: float = 1.0  # share of a micro-step's compute that hides FSDP's all-gathers / reduce-scatters
    fsdp_comm: bool = True  # time FSDP's collectives (false: fitted constants, e.g. FlexSP's beta, include them)
    step_ms: float = 0.0  # fixed time per step outside the micro-steps: loss all-reduce, clipping, optimizer
    calibration: str | None = None  # a calibration.json (sp-train's online fit): its constants replace these
    # achieved attention speed by kernel, apart from the GEMMs' mfu: {kernel: {fwd: TFLOP/s, bwd: TFLOP/s}},
    # causal, counted with the standard FLOPs (forward 4 c L^2 H d, backward twice that); empty: attention at mfu
    attention_tflops: dict[str, Any] = field(default_factory=dict)
    attention_kernel: str = ""  # which of attention_tflops the plan assumes ("" with none given)
    constants_source: str = ""  # where the constants come from (public benchmarks, a calibration on a named host)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "peak_tflops",
            "memory_gib",
            "intra_gbs",
            "inter_gbs",
            "mfu",
            "host_gbps",
            "host_memory_gib",
            "cpu_adam_gparams_per_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"cluster.{name} must be > 0, got {getattr(self, name)}")
        for name in ("ring_overlap", "fsdp_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"cluster.{name}={getattr(self, name)}; valid: 0 (never hidden) .. 1 (fully hidden)")
        if self.step_ms < 0 or self.beta_ms < 0:
            raise ValueError(f"cluster.step_ms={self.step_ms}, beta_ms={self.beta_ms}; valid: >= 0")
        if self.max_communicators < 3:
            raise ValueError(f"cluster.max_communicators={self.max_communicators}; valid: >= 3 (a micro-step's SP "
                             "group and its Ulysses and ring sub-groups)")  # fmt: skip
        if self.comm_gib_per_group < 0:
            raise ValueError(f"cluster.comm_gib_per_group must be >= 0, got {self.comm_gib_per_group}")
        if self.usd_per_gpu_hour is not None and self.usd_per_gpu_hour < 0:
            raise ValueError(f"cluster.usd_per_gpu_hour must be >= 0 (or null), got {self.usd_per_gpu_hour}")
        for name, rates in self.attention_tflops.items():
            ok = (
                isinstance(rates, dict)
                and set(rates) == {"fwd", "bwd"}
                and all(isinstance(v, (int, float)) and 0 < v < 10 * self.peak_tflops for v in rates.values())
            )
            if not ok:
                raise ValueError(f"cluster.attention_tflops.{name}={rates!r}; valid: {{fwd: TFLOP/s, bwd: TFLOP/s}}, "
                                 f"each > 0 and below 10 x peak_tflops ({self.peak_tflops})")  # fmt: skip
        if self.attention_kernel and self.attention_kernel not in self.attention_tflops:
            raise ValueError(f"cluster.attention_kernel={self.attention_kernel!r}; valid: one of "
                             f"cluster.attention_tflops {sorted(self.attention_tflops)} (or '' for attention at "
                             "cluster.mfu)")  # fmt: skip

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    name: str = "custom"  # the model's name (logs, sp-plan)
    layers: int  # transformer layers
    hidden: int  # hidden size h
    heads: int  # query heads
    kv_heads: int | None = None  # key/value heads (GQA); None = heads
    head_dim: int | None = None  # head dimension d; None = hidden / heads
    ffn: int | None = None  # MLP width; None = 4 x hidden
    vocab: int = 32000  # vocabulary size V
    swiglu: bool = True  # SwiGLU MLP (Llama, Qwen); false = GELU
    checkpointing: str = "full"  # "full" | "selective" | "none" | "offload"
    bytes_per_value: int = 2  # bf16 activations and communication
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # output layer shares the input embedding (Qwen2 small models)
    qkv_bias: bool = False  # biases on q, k, v (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3; megatron-core's qk_layernorm)
    rope_theta: float | None = None  # RoPE base; None: 10,000, or the Hugging Face config's with hf_path
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # transformers' rope_scaling: {rope_type: ..., ...}
    hf_path: str | None = None  # a Hugging Face model folder: its config.json sets the architecture fields
    max_position_embeddings: int = 0  # the HF config's (kept for export; yarn's default factor uses it)
    loss_chunk_tokens: int = 0  # > 0: output projection + loss per chunk of this many tokens (models/loss.py)
    tile_tokens: int = 0  # > 0: each layer but its attention core runs over tiles of this size (models/tiling.py)
    head_chunks: int = 2  # Ulysses: heads through the all-to-all in this many chunks, one in flight (sp.attention)
    # mixture of experts (models/moe.py): 0 experts is a dense model
    experts: int = 0  # routed experts per MoE layer (num_experts, num_local_experts)
    experts_per_token: int = 0  # top-k (num_experts_per_tok)
    expert_ffn: int = 0  # each expert's FFN width (Qwen3-MoE moe_intermediate_size; Mixtral intermediate_size)
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0 (decoder_sparse_step) ...
    dense_layers: tuple[int, ...] = ()  # ... and i is not listed here (mlp_only_layers: the dense MLP, ffn wide)
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities (Mixtral always; Qwen3-MoE's flag)
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's coefficient
    expert_grouping: str = "sequential"  # how experts run: sequential (megatron-core SequentialMLP)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))  # a list from a config or JSON
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing={self.checkpointing!r}; valid: {', '.join(map(repr, CHECKPOINTING))}")
        for name in ("layers", "hidden", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"model.{name}={getattr(self, name)}; valid: >= 1 (with model=hf, set model.hf_path=DIR: "
                    "a Hugging Face folder whose config.json has the architecture)"
                )
        if self.heads % self.n_kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.n_kv_heads})")
        if self.rope_theta is not None and not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta={self.rope_theta}; valid: a number > 0 (e.g. 500000)")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"model.rms_norm_eps={self.rms_norm_eps}; valid: a number > 0")
        check_rope_scaling(self.rope_scaling)
        if self.head_chunks < 1:
            raise ValueError(f"model.head_chunks={self.head_chunks}; valid: >= 1 (Ulysses head chunks)")
        for name in ("loss_chunk_tokens", "tile_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}={getattr(self, name)}; valid: 0 (off) or a token count >= 1")
        if self.experts:
            if not 1 <= self.experts_per_token <= self.experts:
                raise ValueError(f"model.experts_per_token={self.experts_per_token}; valid: 1 to model.experts "
                                 f"({self.experts})")  # fmt: skip
            if self.expert_ffn < 1 or self.moe_every < 1:
                raise ValueError(f"model.expert_ffn={self.expert_ffn}, model.moe_every={self.moe_every}; valid: >= 1")
            if self.expert_grouping != "sequential":
                raise ValueError(f"model.expert_grouping={self.expert_grouping!r}; valid: 'sequential' (grouped GEMMs "
                                 "and expert parallelism are not implemented)")  # fmt: skip

    @property
    def theta(self) -> float:
        return 10000.0 if self.rope_theta is None else float(self.rope_theta)

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def d_ffn(self) -> int:
        return self.ffn or 4 * self.hidden

    def moe_layers(self) -> tuple[int, ...]:
        """The layers whose MLP is a mixture of experts (none for a dense model)."""
        if not self.experts:
            return ()
        return tuple(i for i in range(self.layers) if (i + 1) % self.moe_every == 0 and i not in self.dense_layers)

    @property
    def linear_params(self) -> int:
        """Weights every token goes through (the FLOPs per token are 6 x these): attention, the dense MLPs and,
        in MoE layers, the router and the top-k experts it routes to."""
        attn = self.hidden * self.d_head * (2 * self.heads + 2 * self.n_kv_heads)
        per = 3 if self.swiglu else 2
        moe = len(self.moe_layers())
        routed = self.experts_per_token * per * self.hidden * self.expert_ffn + self.hidden * self.experts
        return self.layers * attn + (self.layers - moe) * per * self.hidden * self.d_ffn + moe * routed

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Every parameter's shape, in the Megatron GPT's order (local spec, RMSNorm; the output layer unless
        tied to the embedding)."""
        h = self.hidden
        layers = [s for i in range(self.layers) for s in self.layer_shapes(i)]
        return [(self.vocab, h), *layers, (h,), *([] if self.tie_embeddings else [(self.vocab, h)])]

    def layer_shapes(self, i: int) -> list[tuple[int, ...]]:
        """The parameter shapes of layer ``i`` (an MoE layer: the router and every expert's fc1 and fc2 in place
        of the dense MLP)."""
        h, d = self.hidden, self.d_head
        layer = [
            (h,),  # input_layernorm
            ((self.heads + 2 * self.n_kv_heads) * d, h),  # linear_qkv
            (h, self.heads * d),  # linear_proj
            (h,),  # pre_mlp_layernorm
            ((2 if self.swiglu else 1) * self.d_ffn, h),  # linear_fc1
            (h, self.d_ffn),  # linear_fc2
        ]
        if self.qkv_bias:
            layer.insert(2, ((self.heads + 2 * self.n_kv_heads) * d,))  # linear_qkv.bias
        if self.qk_norm:
            layer[2:2] = [(d,), (d,)]  # q_layernorm, k_layernorm (after linear_qkv, before linear_proj)
        if i not in self.moe_layers():
            return layer
        per = 2 if self.swiglu else 1
        experts: list[tuple[int, ...]] = [(self.experts, h)]  # the router
        experts += [(per * self.expert_ffn, h), (h, self.expert_ffn)] * self.experts
        return layer[:-2] + experts

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes())

    def ulysses_degrees(self, limit: int) -> list[int]:
        """Ulysses degrees u <= limit the heads allow: u divides the q heads and divides the kv heads or is a
        multiple of them (kv heads replicate past their count)."""
        return [u for u in range(1, limit + 1)
                if self.heads % u == 0 and (self.n_kv_heads % u == 0 or u % self.n_kv_heads == 0)]  # fmt: skip


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
    """One SP group of a micro-step: its contiguous rank range (planner.topology), shape, and the sequences
    (indices) it runs."""

    first_rank: int
    shape: GroupShape
    seqs: tuple[int, ...]
    time_s: float
    memory_gib: float

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(range(self.first_rank, self.first_rank + self.shape.size))


@dataclass(frozen=True)
class MemoryMode:
    """How one micro-step trades time for memory: activation checkpointing, the chunked loss's chunk, the
    sequence tile (tokens; 0 = off; each layer but its attention core over tiles) and the Ulysses head chunks
    (one chunk's all-to-all buffers in flight: more chunks, less memory, more collectives). The planner may
    choose one per micro-step (``planner.checkpointing``, ``planner.loss_chunk_tokens``, ``planner.tile_tokens``,
    ``planner.head_chunks``)."""

    checkpointing: str = "full"
    loss_chunk_tokens: int = 0
    tile_tokens: int = 0
    head_chunks: int = 2

    def __post_init__(self) -> None:
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing={self.checkpointing!r}; valid: {', '.join(map(repr, CHECKPOINTING))}")
        if self.head_chunks < 1:
            raise ValueError(f"head_chunks={self.head_chunks}; valid: >= 1")
        if self.loss_chunk_tokens < 0 or self.tile_tokens < 0:
            raise ValueError(f"loss_chunk_tokens={self.loss_chunk_tokens}, tile_tokens={self.tile_tokens}; "
                             "valid: 0 (off) or a token count >= 1")  # fmt: skip

    @classmethod
    def of(cls, model: ModelShape) -> MemoryMode:
        """The model's own settings."""
        return cls(model.checkpointing, model.loss_chunk_tokens, model.tile_tokens, model.head_chunks)

    def on(self, model: ModelShape) -> ModelShape:
        """``model`` running under this mode."""
        return replace(model, checkpointing=self.checkpointing, loss_chunk_tokens=self.loss_chunk_tokens,
                       tile_tokens=self.tile_tokens, head_chunks=self.head_chunks)  # fmt: skip

    @property
    def label(self) -> str:
        """e.g. ``offload, loss chunk 2048, tile 8192`` (the techniques that are on)."""
        parts = [self.checkpointing]
        if self.loss_chunk_tokens:
            parts.append(f"loss chunk {self.loss_chunk_tokens}")
        if self.tile_tokens:
            parts.append(f"tile {self.tile_tokens}")
        if self.head_chunks != MemoryMode.head_chunks:
            parts.append(f"head chunks {self.head_chunks}")
        return ", ".join(parts)


@dataclass(frozen=True)
class FsdpTime:
    """FSDP's collectives in one micro-step (every rank runs every micro-step): ``transfer_s`` of bytes in all,
    ``edge_transfer_s`` of them never hidden (the root's all-gather before the first layer, its
    reduce-scatter after the last), ``collectives`` of them paying ``latency_s`` each (2 at the edges). The
    rest hides behind up to ``overlap`` of the micro-step's compute (:meth:`exposed_s`)."""

    transfer_s: float = 0.0
    edge_transfer_s: float = 0.0
    latency_s: float = 0.0
    collectives: int = 0
    overlap: float = 1.0

    @property
    def comm_s(self) -> float:
        return self.transfer_s + self.collectives * self.latency_s

    @property
    def edge_s(self) -> float:
        return self.edge_transfer_s + 2 * self.latency_s if self.collectives else 0.0

    def exposed_s(self, compute_s: Any, latency_scale: float = 1.0) -> Any:
        """Time not hidden behind a micro-step whose slowest group computes ``compute_s`` (seconds, or an array
        of them), the latency scaled by ``latency_scale`` (the online fit's factor)."""
        if not self.collectives:
            return 0.0 * compute_s
        lat = self.latency_s * latency_scale
        edge = self.edge_transfer_s + 2 * lat
        return np.maximum(edge, self.transfer_s + self.collectives * lat - self.overlap * compute_s)


@dataclass(frozen=True)
class MicroStep:
    groups: tuple[Assignment, ...]
    lower_bound_s: float  # of the groups' time (the slowest group), FSDP aside
    memory: MemoryMode | None = None  # what this micro-step runs with (None: the model's own settings)
    fsdp: FsdpTime = FsdpTime()

    @property
    def groups_s(self) -> float:
        """The slowest group's time."""
        return max(g.time_s for g in self.groups)

    @property
    def fsdp_exposed_s(self) -> float:
        return float(self.fsdp.exposed_s(self.groups_s))

    @property
    def time_s(self) -> float:
        return self.groups_s + self.fsdp_exposed_s

    @property
    def bound_s(self) -> float:
        """A lower bound on this micro-step's time: the groups' bound plus FSDP's exposure at it (the time
        ``T + exposed(T)`` never falls as T grows)."""
        return self.lower_bound_s + float(self.fsdp.exposed_s(self.lower_bound_s))

    @property
    def checkpointing(self) -> str:
        """The activation checkpointing this micro-step runs with ("": the model's)."""
        return self.memory.checkpointing if self.memory is not None else ""

    def mode(self, model: ModelShape) -> MemoryMode:
        """The memory mode this micro-step runs with, the model's own settings where the plan sets none."""
        return self.memory if self.memory is not None else MemoryMode.of(model)


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
        return sum(m.bound_s for m in self.micro_steps)

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
