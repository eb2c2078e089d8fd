"""Cost model: time and memory of one sequence on one SP group shape.

For a sequence of L tokens on a group of P = u x r GPUs (per training step, forward + backward):

- **Compute.** With fitted constants (FlexSP form, ms): ``t_c = (alpha1 L^2 + alpha2 L) / P``. Otherwise from
  the standard FLOPs count: linear ``6 N_lin L`` + logits ``6 V h L`` at ``peak * mfu`` (the GEMMs), attention
  ``12 c n_layers L^2 H d_head`` (c = 1/2 causal; forward 4, backward 8) at the assumed kernel's stated forward
  and backward speeds (``cluster.attention_tflops[cluster.attention_kernel]``), else at ``peak * mfu``;
  activation checkpointing runs the forward again (everything under ``full``, the attention core under
  ``selective``); divided by ``P``. Fitted constants hold for the model's own mode;
  :meth:`CostModel.with_checkpointing` rescales them (alpha1: attention, alpha2: the rest) for another.
- **Ulysses all-to-all** (u > 1): q, k, v, o per layer and pass (fwd, bwd, + recompute fwd under full
  checkpointing); per GPU ``(L / P) (2 H + 2 max(H_kv, u)) d_head bytes (u - 1) / u`` (kv heads replicate past
  u, GQA-aware), over the measured all-to-all bandwidth of a u-group, else intra- or inter-node bandwidth by
  whether u fits in a node.
- **Ring P2P** (r > 1): K/V blocks of ``2 (L / r) (max(H_kv, u) / u) d_head bytes`` per step; forward r - 1
  steps, backward r - 1 K/V plus r dK/dV steps. Each step overlaps the block's attention compute, so only
  ``max(0, comm_step - attn_step)`` is exposed. Bandwidth is inter-node once the group spans nodes.
- **Memory** per GPU = states + (saved + working) bytes per local token x the group's tokens / P.
  States: fp32 parameters, gradients and AdamW moments, 16 bytes per element; under ``fsdp`` each parameter
  is split on dim 0 as FSDP2 does (rank 0 holds ceil(d0 / N) rows), under ``replicate`` whole.
  Saved for backward, per local token (b = bytes per activation value: 2 bf16, 4 fp32; h hidden, d head
  dim, H heads, kv = max(H_kv, u), f ffn, V vocab), counted tensor by tensor against the trainer's
  Megatron GPT (``sp-bench memory`` checks it):
  each RMSNorm b h + 4 (its input, an fp32 rstd: :mod:`models.rms_norm`); linear inputs 2 b h (qkv, fc1);
  attention q, k, v, out (2H + 2kv) d b and fp32 lse 4H;
  the Ulysses output H d b (u > 1 only); SwiGLU MLP 5 f b (fc1 output, its two halves' products, fc2 input).
  With ``model.tile_tokens`` (sequence tiling, :mod:`models.tiling`) a dense layer keeps only its input b h
  beside the attention core's tensors (and the Ulysses output); an MoE layer keeps its tiled parts' input and
  output, and its MoE block as untiled.
  ``none`` keeps all of that per layer; ``selective`` drops RoPE and the attention internals and keeps the
  core attention's inputs (2H + 2H_kv) d b and the projection input H d b; ``full`` keeps b h per layer
  (its input); ``offload`` keeps nothing on the GPU (that input is in host memory:
  :meth:`CostModel.host_bytes_per_token`, L b h per token, against ``cluster.host_memory_gib`` per node).
  Outside the layers: token ids 8, final norm b h + 4, output-layer input b h, fp32 softmax 4V, labels and
  target mask 10 (chunked loss, ``model.loss_chunk_tokens``: an fp32 lse and the labels, 13), RoPE's cos/sin
  table 2 d b (built once per micro-step and shared by every layer).
  Working set on top (transient): one recomputed layer's internals under ``full``/``offload`` (under
  ``offload`` its input is the copy fetched from the host, measured in backward; plus the next layer's input,
  prefetched), logits (b + 8) V (none with the chunked
  loss), all-to-all buffers of one head chunk each way (u > 1, :meth:`CostModel.ulysses_buffer_bytes`), ring
  K/V double buffer 4 kv d b (r > 1); token-independent
  (:meth:`CostModel.fixed_working_bytes`): the chunked loss's backward peak, 4 V h (its fp32 weight-gradient
  accumulator) + max(chunk V (4 + b), b V h) (one chunk's fp32 gradient with its b copy, or the final cast),
  one tile's intermediates (:meth:`CostModel.tile_part_bytes`). A measured ``cluster.act_bytes_per_token``
  (sp-profile) replaces saved + working.
- **Offload time**: the layer inputs come back from host memory before each recompute, L (tokens / P) b h
  bytes at ``cluster.host_gbps``; each layer's copy is prefetched under the next layer's recompute and
  backward (one copy exposed, plus what exceeds 3/4 of a layer's compute; the device-to-host copy overlaps the
  forward). The chunked loss adds one logits matmul per token (its backward recomputes them), 2 V h FLOPs;
  sequence tiling one forward of the tiled parts (the projections and the dense MLPs or routed experts).
- Per group and micro-step (:meth:`CostModel.group_overhead_s`): ``beta`` (ms) plus the latency of the
  group's collectives, paid once per packed batch (all its sequences go through each layer together).
- **FSDP** (:attr:`CostModel.fsdp_time`, ``sharding=fsdp``): every rank runs every micro-step's collectives:
  each layer's parameters all-gathered in forward and again in backward, the root's once, in the parameter
  dtype; every gradient reduce-scattered in fp32 (:meth:`CostModel.fsdp_collective_bytes`, measured to the
  byte by ``sp-bench memory --fsdp``); (N - 1) / N of those bytes cross each GPU's link (inter-node bandwidth
  once the world spans nodes). A micro-step whose slowest group computes T pays
  ``max(edge, comm - cluster.fsdp_overlap x T)``: the root's all-gather before the first layer and its
  reduce-scatter after the last are never hidden. The overlap (default 1) is stated, not measured (no GPU).
- Per step (:attr:`CostModel.step_overhead_s`): ``cluster.step_ms`` (loss all-reduce, clipping, optimizer),
  the same for every plan, so it never changes the planner's choice; predictions of a step's time add it.
- ``cluster.ring_overlap`` (default 1) is the share of a ring step's attention that hides its transfer.
  sp-train fits it, the compute constants, each Ulysses and ring degree's bandwidth, the latency, ``beta`` and
  ``step_ms`` from the steps it measures (:mod:`planner.fit`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from planner.topology import Topology
from planner.types import NORM_TILE_TOKENS, SHARDINGS, Cluster, FsdpTime, GroupShape, MemoryMode, MicroStep, ModelShape

GIB = 2.0**30
RECOMPUTE = {
    "full": (4.0 / 3.0, 4.0 / 3.0),
    "selective": (4.0 / 3.0, 1.0),
    "none": (1.0, 1.0),
    "offload": (4.0 / 3.0, 4.0 / 3.0),
}  # (attention, rest)
LAYER_RECOMPUTE = ("full", "offload")  # modes that run each layer's forward again in backward


def communicators_per_rank(cluster: Cluster) -> int:
    """Communicators one rank holds: the default group, plus the groups the trainer's ``sp.groups.GroupPool``
    keeps (at most ``cluster.max_communicators``, fewer where the topology has fewer a rank can be in)."""
    lists = Topology(cluster.nodes, cluster.gpus_per_node).lists_per_rank()
    return 1 + min(cluster.max_communicators, lists)


@dataclass(frozen=True)
class CostModel:
    cluster: Cluster
    model: ModelShape
    causal: bool = True
    sharding: str = "fsdp"  # the trainer's train.sharding: fsdp (ZeRO-3) | replicate
    state_offload: bool = False  # parameters, gradients and AdamW moments in host memory (planner.state_offload)

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding={self.sharding!r}; valid: {list(SHARDINGS)}")
        if self.state_offload and self.sharding != "fsdp":
            raise ValueError(f"state offload needs sharding='fsdp' (FSDP2's CPUOffloadPolicy), got {self.sharding!r}")

    def with_checkpointing(self, mode: str) -> CostModel:
        """This cost model under another activation checkpointing mode (see :meth:`with_mode`)."""
        return self.with_mode(replace(MemoryMode.of(self.model), checkpointing=mode))

    def for_micro(self, micro: MicroStep) -> CostModel:
        """This cost model under the memory mode a planned micro-step runs with."""
        return self.with_mode(micro.mode(self.model))

    def with_mode(self, mode: MemoryMode) -> CostModel:
        """This cost model under another memory mode (checkpointing, loss chunk, sequence tile). Fitted compute
        constants (taken under the model's own mode) are rescaled by the FLOPs' ratio: ``alpha1`` by the
        attention recompute, ``alpha2`` by the FLOPs per token outside attention (recompute and the
        techniques' extra passes); a measured ``cluster.act_bytes_per_token`` by the byte formulas' ratio."""
        if mode == MemoryMode.of(self.model):
            return self
        other = replace(self, model=mode.on(self.model))
        cl = self.cluster
        if cl.alpha1_ms is not None and cl.alpha2_ms is not None:  # fitted under the model's own mode
            a0, a1 = RECOMPUTE[self.model.checkpointing][0], RECOMPUTE[mode.checkpointing][0]
            lin = other._linear_flops_per_token() / self._linear_flops_per_token()
            other = replace(other, cluster=replace(cl, alpha1_ms=cl.alpha1_ms * a1 / a0, alpha2_ms=cl.alpha2_ms * lin))
        measured = self.cluster.act_bytes_per_token
        if measured is None:
            return other
        plain = replace(self, cluster=replace(self.cluster, act_bytes_per_token=None))
        ratio = replace(other, cluster=replace(other.cluster, act_bytes_per_token=None)).act_bytes_per_token
        ratio /= plain.act_bytes_per_token
        return replace(other, cluster=replace(other.cluster, act_bytes_per_token=measured * ratio))

    def fitted_form(self) -> CostModel:
        """The same predictions with FlexSP-form constants (``alpha1_ms``, ``alpha2_ms``) under the model's own
        checkpointing mode: the form online calibration scales."""
        cl = self.cluster
        if cl.alpha1_ms is not None and cl.alpha2_ms is not None:
            return self
        a1 = float(self._attention_time(1.0)) * 1e3
        a2 = self._linear_flops_per_token() / self._flops_per_s * 1e3
        return replace(self, cluster=replace(cl, alpha1_ms=a1, alpha2_ms=a2))

    # ---- compute ----
    @property
    def _flops_per_s(self) -> float:
        return self.cluster.peak_tflops * 1e12 * self.cluster.mfu

    @property
    def _recompute(self) -> float:
        """Compute factor of the attention core: its forward runs again under full and selective."""
        return RECOMPUTE[self.model.checkpointing][0]

    @property
    def _recompute_linear(self) -> float:
        """Compute factor of everything else (projections, MLP, logits): recomputed under full only."""
        return RECOMPUTE[self.model.checkpointing][1]

    def attention_flops(self, length: np.ndarray | float, recompute: bool = True) -> np.ndarray | float:
        """Attention-core FLOPs of a sequence, the standard count (Megatron-LM's, PaLM's): forward ``4 c L^2 H_q
        d`` per layer (c = 1/2 causal; GQA does not change it; ``H_q d`` is the attention width, not the hidden
        size), backward twice that, ``12 c L^2 H_q d`` in all; with the checkpointing recompute (one more
        forward: x 4/3) unless ``recompute=False`` (what MFU counts)."""
        return 3.0 * self._attention_fwd_flops(length) * (self._recompute if recompute else 1.0)

    def _attention_fwd_flops(self, length: np.ndarray | float) -> np.ndarray | float:
        m = self.model
        c = 0.5 if self.causal else 1.0
        return 4.0 * c * m.layers * np.square(length) * m.heads * m.d_head

    @property
    def attention_rates(self) -> tuple[float, float] | None:
        """The assumed kernel's achieved (forward, backward) FLOP/s, or None: attention at the GEMMs' mfu."""
        cl = self.cluster
        if not cl.attention_kernel:
            return None
        r = cl.attention_tflops[cl.attention_kernel]
        return float(r["fwd"]) * 1e12, float(r["bwd"]) * 1e12

    def _attention_time(self, length: np.ndarray | float) -> np.ndarray | float:
        """Seconds of a sequence's attention core on one GPU (divide by the group size): at the kernel's stated
        forward and backward speeds (the recompute runs the forward again), else at the cluster's mfu."""
        rates = self.attention_rates
        if rates is None:
            return self.attention_flops(length) / self._flops_per_s
        fwd = self._attention_fwd_flops(length)
        again = 2.0 if self._recompute > 1.0 else 1.0
        return again * fwd / rates[0] + 2.0 * fwd / rates[1]

    def _technique_flops_per_token(self) -> float:
        """Extra FLOPs per token: the chunked loss recomputes the logits in backward (2 V h); sequence tiling
        runs its parts' forward once more in backward: the attention projections, and the dense MLPs (2 (3 or 2)
        h f per dense layer) or the routed experts (k (3 or 2) h I per MoE layer)."""
        m = self.model
        extra = 2.0 * m.vocab * m.hidden if m.loss_chunk_tokens else 0.0
        if m.tile_tokens:
            terms = self._linear_terms()
            tiled = terms["attention_projections"] + terms["dense_mlp"] + terms["routed_experts"]
            extra += tiled / 3.0  # one forward of the 6 x (fwd + bwd)
        return extra

    def _linear_terms(self) -> dict[str, float]:
        """Model FLOPs per token outside the attention core, by part (6 x the weights each token goes through)."""
        m = self.model
        per = 3 if m.swiglu else 2
        moe = len(m.moe_layers())
        return {
            "attention_projections": 6.0 * m.layers * m.hidden * m.d_head * (2 * m.heads + 2 * m.n_kv_heads),
            "dense_mlp": 6.0 * (m.layers - moe) * per * m.hidden * m.d_ffn,
            "routed_experts": 6.0 * moe * m.experts_per_token * per * m.hidden * m.expert_ffn,
            "router": 6.0 * moe * m.hidden * m.experts,
            "output_layer": 6.0 * m.vocab * m.hidden,
        }

    def flops_terms(self, lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
        """:meth:`model_flops` of these sequences by part: the attention core (each sequence's quadratic term),
        the attention projections, the dense MLPs, the routed experts (the top-k each token goes to), the
        routers and the output layer; and their total."""
        n = np.asarray(lengths, dtype=np.float64)
        out = {"attention_core": float(np.sum(self.attention_flops(n, recompute=False)))}
        out |= {k: v * float(n.sum()) for k, v in self._linear_terms().items()}
        out["total"] = sum(out.values())
        return out

    def model_flops(self, lengths: Sequence[int] | np.ndarray) -> float:
        """The model FLOPs of one step over these sequences (fwd + bwd, no recompute, no technique extras:
        what MFU counts): 6 x (linear params + the logits' V h) per token plus each sequence's own attention
        quadratic term."""
        m = self.model
        n = np.asarray(lengths, dtype=np.float64)
        return float(6.0 * (m.linear_params + m.vocab * m.hidden) * n.sum()
                     + np.sum(self.attention_flops(n, recompute=False)))  # fmt: skip

    def mfu(self, lengths: Sequence[int] | np.ndarray, seconds: float, gpus: int) -> float:
        """Model FLOP utilisation of a step of ``seconds`` on ``gpus`` devices at the cluster's peak."""
        return self.model_flops(lengths) / (seconds * gpus * self.cluster.peak_tflops * 1e12) if seconds > 0 else 0.0

    def _linear_flops_per_token(self) -> float:
        """FLOPs per token outside attention (fwd + bwd, with the recompute and the techniques' extras)."""
        m = self.model
        return 6.0 * (m.linear_params + m.vocab * m.hidden) * self._recompute_linear + self._technique_flops_per_token()

    def compute_s(self, length: np.ndarray | float, size: int) -> np.ndarray | float:
        cl = self.cluster
        if cl.alpha1_ms is not None and cl.alpha2_ms is not None:
            return (cl.alpha1_ms * np.square(length) + cl.alpha2_ms * length) / size / 1e3
        return (self._linear_flops_per_token() * length / self._flops_per_s + self._attention_time(length)) / size

    def attention_s(self, length: np.ndarray | float, size: int) -> np.ndarray | float:
        """The attention share of :meth:`compute_s` (what ring communication can hide behind)."""
        cl = self.cluster
        if cl.alpha1_ms is not None:
            return cl.alpha1_ms * np.square(length) / size / 1e3
        return self._attention_time(length) / size

    # ---- communication ----
    @property
    def _passes(self) -> int:
        return 3 if self.model.checkpointing in LAYER_RECOMPUTE else 2

    def offload_s(self, length: np.ndarray | float, size: int, compute: Any = None) -> np.ndarray | float:
        """``offload`` mode: each layer's input (b h bytes per local token) comes back from host memory before
        its recompute. The last layer's copy is on the critical path; every other one is prefetched while the
        layer after it recomputes and back-propagates (3/4 of its compute: recompute 1, backward 2 of the 4
        forward-equivalents), so only what exceeds that is exposed (the device-to-host copy overlaps the
        forward)."""
        m = self.model
        if m.checkpointing != "offload":
            return 0.0 * length
        copy = (length / size) * m.bytes_per_value * m.hidden / (self.cluster.host_gbps * 1e9)  # one layer's
        hidden_by = 0.75 * (self.compute_s(length, size) if compute is None else compute) / m.layers
        return copy + (m.layers - 1) * np.maximum(0.0, copy - hidden_by)

    def _bw(self, table: dict[int, float], n: int, spans_nodes: bool) -> float:
        """Bytes/s per GPU among ``n`` peers: the measured figure; for a size not measured (a group of 3, 6,
        24 ...), linear between the measured sizes around it on the same side of the node boundary, the
        nearest one outside them, ``inter_gbs`` / ``intra_gbs`` with none measured on its side."""
        if n in table:
            return table[n] * 1e9
        side = sorted(k for k in table if (k > self.cluster.gpus_per_node) == spans_nodes)
        if not side:
            return (self.cluster.inter_gbs if spans_nodes else self.cluster.intra_gbs) * 1e9
        below, above = [k for k in side if k < n], [k for k in side if k > n]
        if below and above:
            a, b = below[-1], above[0]
            return (table[a] + (table[b] - table[a]) * (n - a) / (b - a)) * 1e9
        return table[below[-1] if below else above[0]] * 1e9

    def a2a_s(self, length: np.ndarray | float, shape: GroupShape) -> np.ndarray | float:
        u = shape.ulysses
        if u == 1:
            return 0.0 * length
        m, cl = self.model, self.cluster
        spans = u > cl.gpus_per_node
        kv = max(m.n_kv_heads, u)
        per_gpu = length / shape.size * (2 * m.heads + 2 * kv) * m.d_head * m.bytes_per_value * (u - 1) / u
        return per_gpu * m.layers * self._passes / self._bw(cl.a2a_gbs, u, spans)

    def ring_terms(
        self, length: np.ndarray | float, shape: GroupShape, attention_1: Any = None
    ) -> tuple[Any, Any, int, int]:
        """One ring step's K/V transfer time and its forward attention compute per layer (seconds, before
        overlap), and the steps per layer that hide behind one and behind two such computes (forward and
        recompute steps; backward steps, whose attention costs twice the forward). ``attention_1``:
        ``attention_s(length, 1)`` when the caller has it."""
        r, u = shape.ring, shape.ulysses
        m, cl = self.model, self.cluster
        spans = shape.size > cl.gpus_per_node
        kv = max(m.n_kv_heads, u)
        step_bytes = 2 * (length / r) * (kv / u) * m.d_head * m.bytes_per_value
        comm = step_bytes / self._bw(cl.p2p_gbs, r, spans)
        attn = self.attention_s(length, shape.size) if attention_1 is None else attention_1 / shape.size
        attn_fwd = attn / self._recompute / 3.0 / r / m.layers  # one fwd step
        return comm, attn_fwd, (r - 1) * (2 if m.checkpointing in LAYER_RECOMPUTE else 1), 2 * r - 1

    def ring_exposed_s(self, length: np.ndarray | float, shape: GroupShape, attention_1: Any = None) -> Any:
        """Ring transfer time not hidden: per step ``max(0, comm - ring_overlap x attention)``."""
        if shape.ring == 1:
            return 0.0 * length
        comm, attn, fwd_steps, bwd_steps = self.ring_terms(length, shape, attention_1)
        o = self.cluster.ring_overlap
        exposed = fwd_steps * np.maximum(0.0, comm - o * attn) + bwd_steps * np.maximum(0.0, comm - 2 * o * attn)
        return self.model.layers * exposed

    def seq_time_s(self, length: np.ndarray | float, shape: GroupShape) -> np.ndarray | float:
        return (self.compute_s(length, shape.size) + self.a2a_s(length, shape) + self.ring_exposed_s(length, shape)
                + self.offload_s(length, shape.size))  # fmt: skip

    def seq_time_matrix(self, lengths: np.ndarray, shapes: Sequence[GroupShape]) -> np.ndarray:
        """[S, K] :meth:`seq_time_s` of every sequence on every shape, the terms that scale as 1 / size (the
        compute and its attention share) computed once: the planner's instance on many shapes."""
        n = np.asarray(lengths, dtype=np.float64)
        compute_1, attention_1 = self.compute_s(n, 1), self.attention_s(n, 1)
        cols = []
        for sh in shapes:
            compute = compute_1 / sh.size
            cols.append(compute + self.a2a_s(n, sh) + self.ring_exposed_s(n, sh, attention_1)
                        + self.offload_s(n, sh.size, compute))  # fmt: skip
        return np.stack(cols, axis=1) if cols else np.zeros((len(n), 0))

    @property
    def beta_s(self) -> float:
        return self.cluster.beta_ms / 1e3

    @property
    def step_overhead_s(self) -> float:
        """Fixed time per step outside the micro-steps (``cluster.step_ms``): a step's predicted duration is
        its plan's ``time_s`` plus this, and under state offload the AdamW update on the host
        (:meth:`host_optimizer_s`)."""
        return self.cluster.step_ms / 1e3 + self.host_optimizer_s()

    def host_optimizer_s(self) -> float:
        """Under state offload, AdamW over this rank's shard on the host CPUs (``cluster.cpu_adam_gparams_per_s``;
        ``sp-bench cpu-adam`` measures it), once per step; 0 otherwise."""
        return self._host_state_gib * GIB / 16 / (self.cluster.cpu_adam_gparams_per_s * 1e9)

    def collectives(self, shape: GroupShape) -> int:
        """All-to-alls and ring steps one micro-step of this group runs (each pays the link latency once)."""
        m = self.model
        n = 0
        if shape.ulysses > 1:  # q, k, v out and the output back, per head chunk
            n += m.layers * self._passes * 4 * self.head_chunks(shape.ulysses)
        if shape.ring > 1:
            r = shape.ring
            n += m.layers * ((r - 1) * (2 if m.checkpointing in LAYER_RECOMPUTE else 1) + 2 * r - 1)
        return n

    def latency_s(self, shape: GroupShape) -> float:
        cl = self.cluster
        return (cl.inter_latency_us if shape.size > cl.gpus_per_node else cl.intra_latency_us) * 1e-6

    def group_overhead_s(self, shape: GroupShape) -> float:
        """Fixed time of one group's micro-step: ``beta`` plus the latency of its collectives. A group runs
        all its sequences as one packed batch, so each all-to-all and ring step is paid once per layer and
        pass, not once per sequence."""
        return self.beta_s + self.collectives(shape) * self.latency_s(shape)

    # ---- memory ----
    def saved_bytes_per_token(self, u: int = 1) -> float:
        """Bytes saved for backward per local token (see the module docstring), for Ulysses degree ``u``."""
        m = self.model
        moe = len(m.moe_layers())
        per_layer = (m.layers - moe) * self._layer_bytes(u, m.checkpointing, False)
        return per_layer + moe * self._layer_bytes(u, m.checkpointing, True) + self._outside_bytes()

    def _layer_bytes(self, u: int, mode: str, moe: bool) -> float:
        """Saved per token by one layer (a dense or an MoE one) under checkpointing ``mode``."""
        m = self.model
        b, h, d, f, heads = m.bytes_per_value, m.hidden, m.d_head, m.d_ffn, m.heads
        kv = max(m.n_kv_heads, u)  # kv heads replicate past their count
        norm = b * h + 4  # its input (compute dtype) + an fp32 rstd (models.rms_norm)
        rope_attn = (2 * heads + 2 * kv) * d * b + 4 * heads  # q k v out; lse (RoPE's cos/sin: outside the layers)
        proj_in = heads * d * b if u > 1 else 0  # the Ulysses output is a fresh tensor, not the saved out
        mlp = self._routed_mlp_bytes() if moe else (5 if m.swiglu else 2) * f * b  # tiled: replaced below
        none = 2 * norm + 2 * b * h + rope_attn + proj_in + mlp + self._qk_norm_bytes()
        selective = none - rope_attn - proj_in + self._core_inputs_bytes() + heads * d * b
        if m.tile_tokens:  # sequence tiling: the layer's input, the attention core's tensors, the Ulysses output
            moe_block = norm + b * h + mlp if moe else 0  # untiled: its norm (input: the tiled part's output) and
            none = b * h + rope_attn + proj_in + moe_block  # the router's input
            selective = b * h + (2 * heads + 2 * m.n_kv_heads) * d * b + moe_block  # fresh q, k, v; the core's output
        return {
            "none": none,
            "selective": selective,
            "full": b * h,  # the layer's input, kept by the checkpoint
            "offload": 0,  # that input is in host memory (host_bytes_per_token)
        }[mode]

    def _routed_mlp_bytes(self) -> float:
        """Per token, what megatron-core's MoE layer (all-gather dispatcher, sequential experts, the router of
        :mod:`models.moe`) saves beyond its input (counted with the linear inputs): per expert, the fp32 router
        probabilities, the routing map (bool) and its transposed probabilities (b); when the top-k is
        renormalised, its sum and values (fp32: 4 + 4 k); per routed copy, the top-k index and the permutation
        index (int64), the permuted token (h b) and probability (b), and the expert's SwiGLU internals with the
        routing weight applied inside it (6 I b: fc1 output, its halves' products, the weighted copy, fc2 input;
        none when the experts run tiled, which keep only their input rows)."""
        m = self.model
        b, e, k = m.bytes_per_value, m.experts, m.experts_per_token
        experts = 0 if m.tile_tokens else (6 if m.swiglu else 3) * m.expert_ffn * b
        renorm = 4 + 4 * k if m.norm_topk_prob else 0
        return e * (5 + b) + renorm + k * (16 + b * (m.hidden + 1) + experts)

    def _core_inputs_bytes(self) -> float:
        """Per token and layer, what selective checkpointing keeps of the core attention's inputs (by storage):
        q is a reshaped copy out of the fused qkv output (H d b) and k, v are views of that output ((H + 2 kv) d
        b). With q/k norms, q and k are the norms' fresh outputs ((H + kv) d b) and v holds the qkv output,
        which the k norm keeps already (:meth:`_qk_norm_bytes`)."""
        m = self.model
        b, d, heads, kv = m.bytes_per_value, m.d_head, m.heads, m.n_kv_heads
        return ((heads + kv) if m.qk_norm else (2 * heads + 2 * kv)) * d * b

    def _qk_norm_bytes(self) -> float:
        """Per token and layer, Qwen3's per-head q/k RMSNorms (:mod:`models.rms_norm`, Megatron's
        qk_layernorm): their inputs, the q heads (a reshaped copy of the fused qkv output, H d b) and the whole
        qkv output (k is a view of it, (H + 2 kv) d b), and an fp32 rstd per head."""
        m = self.model
        if not m.qk_norm:
            return 0.0
        return (2 * m.heads + 2 * m.n_kv_heads) * m.d_head * m.bytes_per_value + 4 * (m.heads + m.n_kv_heads)

    def _outside_bytes(self) -> float:
        """Saved per token outside the layers: token ids, final norm, output-layer input, the fp32 softmax,
        labels and the loss's target mask (chunked loss: an fp32 lse and the labels), and RoPE's cos/sin
        table, built once per micro-step and shared by every layer (``2 d b``, held by the SP context)."""
        m = self.model
        loss = 4 + 9 if m.loss_chunk_tokens else 4 * m.vocab + 10
        norm = m.bytes_per_value * m.hidden + 4  # the final norm: its input and an fp32 rstd (models.rms_norm)
        return 8 + norm + m.bytes_per_value * m.hidden + loss + 2 * m.d_head * m.bytes_per_value

    def working_bytes_per_token(self, u: int = 1, r: int = 1) -> float:
        """Transient bytes per local token on top of the saved ones (not seen by saved-tensor hooks): the
        recomputed layer under full checkpointing, the logits with their fp32 copy and softmax, and the
        Ulysses all-to-all (one head chunk each way: :meth:`ulysses_buffer_bytes`) and ring (two K/V blocks in
        flight) buffers."""
        m = self.model
        b, d, kv = m.bytes_per_value, m.d_head, max(m.n_kv_heads, u)
        layer = 0.0
        if m.checkpointing in LAYER_RECOMPUTE:  # the recomputed layer's internals (the larger kind of layer)
            moe_layers = set(m.moe_layers())
            kinds = {i in moe_layers for i in range(m.layers)}  # dense, MoE or both
            layer = max(self._layer_bytes(u, "none", moe) for moe in kinds)
            if m.checkpointing == "offload":
                layer += b * m.hidden  # the next layer's input, prefetched (the fetched one is the layer's own)
        logits = self._logits_bytes_per_token()
        return layer + logits + self.ulysses_buffer_bytes(u) + (2 * 2 * kv * d * b if r > 1 else 0)

    def head_chunks(self, u: int) -> int:
        """The Ulysses head chunks a group of degree ``u`` runs: the model's ``head_chunks`` limited to a
        divisor of the kv heads each rank receives (``sp.ulysses.HeadPlan``)."""
        m = self.model
        return math.gcd(m.head_chunks, max(m.n_kv_heads, u) // u) if u > 1 else 1

    def ulysses_buffer_bytes(self, u: int) -> float:
        """The all-to-all buffers in flight per local token (:mod:`sp.attention`, measured by
        ``sp.ulysses.CommBuffers``): a chunk's q, k, v (A) going out and its output (B) coming back, each a send
        copy and a receive buffer, one chunk each way at a time: ``2 (A + B)``, or ``2 A`` with one chunk; in
        backward the roles swap (the output's gradient out, q, k, v's back), the same bytes."""
        if u == 1:
            return 0.0
        m, n = self.model, self.head_chunks(u)
        a = (m.heads + 2 * max(m.n_kv_heads, u)) * m.d_head * m.bytes_per_value / n
        return 2 * a + (2 * m.heads * m.d_head * m.bytes_per_value / n if n > 1 else 0.0)

    def _logits_bytes_per_token(self) -> float:
        """Transient logits per token: bf16/fp32 logits, their fp32 copy and softmax; none when chunked."""
        m = self.model
        return 0.0 if m.loss_chunk_tokens else (m.bytes_per_value + 8) * m.vocab

    def fixed_working_bytes(self) -> float:
        """Transient bytes that do not grow with the tokens: the chunked loss's backward peak (its fp32
        output-weight accumulator, plus the larger of one chunk's fp32 gradient with its compute-dtype copy and
        the accumulator's final cast to the weight's dtype: :mod:`models.loss`); one tile's intermediates."""
        m = self.model
        out = 0.0
        if m.loss_chunk_tokens:
            cast = m.bytes_per_value if m.bytes_per_value < 4 else 0  # an fp32 model has no half-precision copies
            out += 4 * m.vocab * m.hidden + max(m.loss_chunk_tokens * m.vocab * (4 + cast), cast * m.vocab * m.hidden)
        if m.tile_tokens:
            out += m.tile_tokens * max(self.tile_part_bytes().values())
        return out

    def tile_part_bytes(self) -> dict[str, float]:
        """Per token of a tile, what the recompute of one tiled part saves for its backward (:mod:`models.tiling`;
        one part's tile is in flight at a time): ``before`` the attention core, the input norm's rstd, the qkv
        projection's input and the q/k norms' (:meth:`_qk_norm_bytes`); ``after`` it in a dense layer, the MLP
        norm's input and rstd, fc1's input and the MLP's intermediates (5 f b SwiGLU, 2 f b GELU); an MoE
        layer's experts, each routed row's intermediates with its weight applied (6 or 3 I b). Measured in
        backward by ``tests/test_memory_techniques.py``."""
        m = self.model
        b, h = m.bytes_per_value, m.hidden
        out = {"before": b * h + 4 + self._qk_norm_bytes()}
        if len(m.moe_layers()) < m.layers:
            out["after"] = 2 * b * h + 4 + (5 if m.swiglu else 2) * m.d_ffn * b
        if m.experts:
            out["experts"] = (6 if m.swiglu else 3) * m.expert_ffn * b
        return out

    def norm_tile_bytes(self) -> float:
        """A bound on the RMSNorm's transient fp32 temporaries (:mod:`models.rms_norm`): at most 20 bytes per
        element of one tile of ``NORM_TILE_TOKENS`` tokens (the backward's fp32 normalised values, gradient
        and product, with their casts), plus the fp32 weight-gradient accumulator; tested as a bound and as
        independent of the local token count."""
        return (20 * NORM_TILE_TOKENS + 4) * self.model.hidden

    def fsdp_unsharded_bytes(self) -> dict[str, float]:
        """FSDP2's transient unsharded state at the activation peak (the start of backward), per GPU: the root
        unit's parameters (embedding, final norm and output layer: all-gathered for the whole pass), the
        current layer's and ``cluster.fsdp_prefetch_layers`` prefetched layers' parameters, the current layer's
        gradients before their reduce-scatter (all in the parameter dtype: bf16 under bf16 precision), and the
        reduce-scatter's flat fp32 input buffer of one layer. The parameters and gradients are what
        :class:`trainer.memory.FsdpUnsharded` measures (on the CPU: no prefetch); the buffer is a formula.
        The root's own gradients and buffer come at the end of backward, when the activations are gone."""
        m = self.model
        if self.sharding != "fsdp":
            return {}
        b = 2 if m.bytes_per_value == 2 else 4
        layers, root = self._fsdp_units
        layer = max(sum(math.prod(s) for s in unit) for unit in layers)  # the largest (an MoE layer's)
        root_n = sum(math.prod(s) for s in root)
        out = {"params": (root_n + (1 + self.cluster.fsdp_prefetch_layers) * layer) * b, "grads": layer * b,
               "reduce_scatter": 4.0 * layer}  # fmt: skip
        if self.state_offload:  # the fp32 shards copied in from the host for the all-gathers in flight
            out["host_copies"] = 4.0 * -(-layer // self.cluster.world) * (1 + self.cluster.fsdp_prefetch_layers)
        return out

    @cached_property
    def _fsdp_units(self) -> tuple[list[list[tuple[int, ...]]], list[tuple[int, ...]]]:
        """Parameter shapes of every layer's FSDP unit and of the root unit (embedding, final norm, output)."""
        m = self.model
        root = [(m.vocab, m.hidden), (m.hidden,), *([] if m.tie_embeddings else [(m.vocab, m.hidden)])]
        return [m.layer_shapes(i) for i in range(m.layers)], root

    def fsdp_collective_bytes(self) -> dict[str, float]:
        """Bytes FSDP2's collectives move per micro-step, counted as their unsharded buffers (each parameter
        padded on dim 0 to a multiple of the world, as FSDP2 shards it): ``all_gather`` every layer twice
        (forward, and backward after the reshard) and the root once, in the parameter dtype;
        ``reduce_scatter`` every gradient once, in fp32. What :class:`trainer.fsdp_traffic.FsdpTraffic`
        measures (``sp-bench memory --fsdp``)."""
        m, n = self.model, self.cluster.world
        if self.sharding != "fsdp":
            return {}
        if n == 1:  # FSDP2 on one rank runs no collectives
            return {"all_gather": 0.0, "reduce_scatter": 0.0, "edge": 0.0}
        layers, root = self._padded_elements
        b = 2 if m.bytes_per_value == 2 else 4
        return {"all_gather": (2 * layers + root) * b, "reduce_scatter": (layers + root) * 4.0,
                "edge": root * (b + 4.0)}  # fmt: skip

    @cached_property
    def _padded_elements(self) -> tuple[int, int]:
        """Elements of every layer's parameters and of the root unit's, each parameter padded on dim 0 to a
        multiple of the world as FSDP2 shards it (so each rank's shard is 1 / world of these)."""
        n = self.cluster.world
        padded = lambda unit: sum(-(-s[0] // n) * n * math.prod(s[1:]) for s in unit)  # noqa: E731
        units, root = self._fsdp_units
        return sum(padded(u) for u in units), padded(root)

    @cached_property
    def fsdp_time(self) -> FsdpTime:
        """FSDP2's collectives per micro-step on each GPU: every layer's parameters all-gathered in forward and
        again in backward (resharded after forward), the root's once (FSDP2 keeps the root unsharded from
        forward to backward), all in the parameter dtype; every gradient reduce-scattered in fp32. A ring
        collective moves (N - 1) / N of the unsharded bytes through each GPU's link: ``cluster.inter_gbs`` once
        the world spans nodes, else ``intra_gbs``. Hidden behind up to ``cluster.fsdp_overlap`` of the
        micro-step's compute, except the root's all-gather and reduce-scatter at its edges (stated, not
        measured here: no GPU). ``cluster.fsdp_comm=false`` leaves it out, for constants fitted with it
        inside (FlexSP's published ``beta``). Under ``replicate`` the gradient all-reduce runs once per step, bucketed
        into the last backward (not counted)."""
        m, cl = self.model, self.cluster
        n = cl.world
        if self.sharding != "fsdp" or n == 1 or not cl.fsdp_comm:
            return FsdpTime()
        moved = self.fsdp_collective_bytes()
        spans = n > cl.gpus_per_node
        per_byte = (n - 1) / n / ((cl.inter_gbs if spans else cl.intra_gbs) * 1e9)
        return FsdpTime(transfer_s=(moved["all_gather"] + moved["reduce_scatter"]) * per_byte + self.pcie_s(),
                        edge_transfer_s=moved["edge"] * per_byte,
                        latency_s=(cl.inter_latency_us if spans else cl.intra_latency_us) * 1e-6,
                        collectives=3 * m.layers + 2, overlap=cl.fsdp_overlap)  # fmt: skip

    def pcie_bytes(self) -> float:
        """Under state offload, bytes one rank moves over PCIe per micro-step: its fp32 parameter shard
        copied to the GPU before each all-gather (every layer twice, the root once) and its fp32 gradient shard
        copied back after each reduce-scatter (FSDP2's ``CPUOffloadPolicy``); 0 otherwise."""
        if not self.state_offload:  # (state offload implies fsdp: __post_init__)
            return 0.0
        layers, root = (e // self.cluster.world for e in self._padded_elements)  # this rank's shard
        return 4.0 * (2 * layers + root) + 4.0 * (layers + root)

    def pcie_s(self) -> float:
        """:meth:`pcie_bytes` at ``cluster.host_gbps``; it runs beside FSDP's collectives and is hidden with
        them behind the micro-step's compute (:class:`FsdpTime`)."""
        return self.pcie_bytes() / (self.cluster.host_gbps * 1e9)

    def host_bytes_per_token(self) -> float:
        """Host memory per local token (``offload``: every layer's input)."""
        m = self.model
        return m.layers * m.bytes_per_value * m.hidden if m.checkpointing == "offload" else 0.0

    @property
    def act_bytes_per_token(self) -> float:
        """Saved + working bytes per local token, at the worst Ulysses degree this cluster allows."""
        return self.shape_bytes_per_token(None)

    def shape_bytes_per_token(self, shape: GroupShape | None) -> float:
        """Saved + working bytes per local token of a group of ``shape`` (its Ulysses degree and ring); None:
        the worst shape this cluster allows (a Ulysses degree at its worst, with a ring)."""
        if self.cluster.act_bytes_per_token is not None:
            return self.cluster.act_bytes_per_token
        key = (shape.ulysses, shape.ring) if shape is not None else None
        if key not in self._shape_bytes:  # called per shape, group and plan: computed once each
            self._shape_bytes[key] = self._bytes_of(shape)
        return self._shape_bytes[key]

    @cached_property
    def _shape_bytes(self) -> dict[tuple[int, int] | None, float]:
        return {}

    def _bytes_of(self, shape: GroupShape | None) -> float:
        u, r = self._layout(shape)
        return self.saved_bytes_per_token(u) + self.working_bytes_per_token(u, r)

    def _layout(self, shape: GroupShape | None) -> tuple[int, int]:
        """(u, r) of ``shape``; None: the worst this cluster allows, a Ulysses degree at its worst with a ring."""
        if shape is not None:
            return shape.ulysses, shape.ring
        us = self.model.ulysses_degrees(self.cluster.world)
        return max(us, key=lambda u: self.saved_bytes_per_token(u) + self.working_bytes_per_token(u, 2)), 2

    def state_bytes(self, rank: int = 0) -> int:
        """Exact bytes of one rank's fp32 parameters, gradients and AdamW moments (4 x 4 bytes per element).
        Under fsdp each parameter is split on dim 0 as FSDP2 does (``torch.chunk``: ceil(d0 / N) rows per
        rank, the last ranks get fewer or none); rank 0 holds the most."""
        if self.sharding == "replicate":
            return 16 * self.model.params
        n = self.cluster.world
        total = 0
        for shape in self.model.param_shapes():
            rows = -(-shape[0] // n)
            mine = max(0, min(shape[0], (rank + 1) * rows) - rank * rows)
            total += mine * math.prod(shape[1:])
        return 16 * total

    def states_gib(self) -> float:
        return self._states_gib

    def comm_gib(self) -> float:
        """NCCL buffers: the communicators one rank holds (:func:`communicators_per_rank`) times
        ``cluster.comm_gib_per_group``."""
        return communicators_per_rank(self.cluster) * self.cluster.comm_gib_per_group

    def reserved_gib(self) -> float:
        """Memory that does not depend on the tokens: states, communicators, FSDP's unsharded parameters and
        gradients in flight, the fixed working set."""
        return self._reserved_gib

    @cached_property
    def _reserved_gib(self) -> float:  # called per group and plan: computed once
        fsdp = sum(self.fsdp_unsharded_bytes().values())
        fixed = self.fixed_working_bytes() + self.norm_tile_bytes()
        return self.states_gib() + self.comm_gib() + (fixed + fsdp) / GIB

    @cached_property
    def _states_gib(self) -> float:  # called per group and plan: computed once
        return 0.0 if self.state_offload else self.state_bytes(0) / GIB

    def host_state_gib(self) -> float:
        """States each rank keeps in host memory under state offload (0 otherwise)."""
        return self._host_state_gib

    @cached_property
    def _host_state_gib(self) -> float:  # called per group and plan: computed once
        return self.state_bytes(0) / GIB if self.state_offload else 0.0

    def tokens_capacity(self, size: int, shape: GroupShape | None = None) -> float:
        """Tokens a group of ``size`` GPUs can hold in one micro-step; with ``shape``, under that layout's
        bytes per token (:meth:`shape_bytes_per_token`), else under the worst layout's."""
        free = (self.cluster.memory_gib - self.reserved_gib()) * GIB
        gpu = max(0.0, free) / self.shape_bytes_per_token(shape) * size
        host = self.host_bytes_per_token()
        if host == 0:
            return gpu
        per_gpu = self.cluster.host_memory_gib * GIB / self.cluster.gpus_per_node  # the node's host memory, shared
        per_gpu -= self.host_state_gib() * GIB
        return min(gpu, max(0.0, per_gpu) / host * size)

    def activation_gib(self, tokens: float, size: int, u: int = 1) -> float:
        """Bytes saved for backward on each GPU of a group of ``size`` (Ulysses degree ``u``) running
        ``tokens`` tokens: what :class:`trainer.memory.SavedBytes` measures."""
        return self.saved_bytes_per_token(u) * tokens / size / GIB

    def memory_gib(self, tokens: float, size: int, shape: GroupShape | None = None) -> float:
        return self.reserved_gib() + self.shape_bytes_per_token(shape) * tokens / size / GIB

    def memory_breakdown_gib(self, local_tokens: float, shape: GroupShape | None = None) -> dict[str, float]:
        """Peak memory per GPU holding ``local_tokens`` tokens, by part (the worst Ulysses degree):
        states, saved activations, the transient working set (logits with their fp32 copy and softmax, the
        recomputed layer, communication buffers) and NCCL communicators. A measured
        ``cluster.act_bytes_per_token`` replaces the saved + working split by one ``activations`` entry."""
        out = {"states": self.states_gib(), "communicators": self.comm_gib()}
        if self.fsdp_unsharded_bytes():
            out["fsdp_unsharded"] = sum(self.fsdp_unsharded_bytes().values()) / GIB
        if self.fixed_working_bytes():
            out["fixed_working"] = self.fixed_working_bytes() / GIB
        out["norm_tile"] = self.norm_tile_bytes() / GIB
        if self.cluster.act_bytes_per_token is not None:
            out["activations"] = self.cluster.act_bytes_per_token * local_tokens / GIB
        else:
            u, r = self._layout(shape)
            out["saved"] = self.saved_bytes_per_token(u) * local_tokens / GIB
            logits = self._logits_bytes_per_token() * local_tokens / GIB
            out["logits"] = logits
            out["working_other"] = self.working_bytes_per_token(u, r) * local_tokens / GIB - logits
        out["total"] = sum(out.values())
        if self.host_bytes_per_token():
            out["host_offload_per_gpu"] = self.host_bytes_per_token() * local_tokens / GIB  # not in the GPU total
        if self.state_offload:
            out["host_states_per_gpu"] = self.host_state_gib()  # not in the GPU total
        return out
