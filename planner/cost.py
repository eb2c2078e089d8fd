"""Cost model: time and memory of one sequence on one SP group shape.

For a sequence of L tokens on a group of P = u x r GPUs (per training step, forward + backward):

- **Compute.** With fitted constants (FlexSP form, ms): ``t_c = (alpha1 L^2 + alpha2 L) / P``. Otherwise from
  FLOPs: linear ``6 N_lin L`` + logits ``6 V h L`` + attention ``6 c n_layers L^2 H d_head`` (c = 1/2 causal),
  times 4/3 with full activation checkpointing (the forward runs twice), divided by ``P * peak * mfu``.
- **Ulysses all-to-all** (u > 1): q, k, v, o per layer and pass (fwd, bwd, + recompute fwd under full
  checkpointing); per GPU ``(L / P) (2 H + 2 max(H_kv, u)) d_head bytes (u - 1) / u`` (kv heads replicate past
  u, GQA-aware), over the measured all-to-all bandwidth of a u-group, else intra- or inter-node bandwidth by
  whether u fits in a node.
- **Ring P2P** (r > 1): K/V blocks of ``2 (L / r) (max(H_kv, u) / u) d_head bytes`` per step; forward r - 1
  steps, backward r - 1 K/V plus r dK/dV steps. Each step overlaps the block's attention compute, so only
  ``max(0, comm_step - attn_step)`` is exposed. Bandwidth is inter-node once the group spans nodes.
- **Memory** per GPU: model + optimizer states (16 bytes/param, divided over the world under ZeRO-3) plus
  activations ``a`` bytes per token times the group's tokens / P. ``a`` is measured (profile) or derived:
  full checkpointing keeps each layer's input (2 h bytes/layer) plus one layer's working set (34 h bytes);
  selective keeps 34 h per layer; logits add 4 V bytes per token on the last stage.
- Per group and micro-step (:meth:`CostModel.group_overhead_s`): ``beta`` (ms) plus the latency of the
  group's collectives, paid once per packed batch (all its sequences go through each layer together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.types import Cluster, GroupShape, ModelShape

GIB = 2.0**30


@dataclass(frozen=True)
class CostModel:
    cluster: Cluster
    model: ModelShape
    causal: bool = True
    zero_stage: int = 3

    # ---- compute ----
    @property
    def _flops_per_s(self) -> float:
        return self.cluster.peak_tflops * 1e12 * self.cluster.mfu

    @property
    def _recompute(self) -> float:
        return 4.0 / 3.0 if self.model.checkpointing == "full" else 1.0

    def attention_flops(self, length: np.ndarray | float) -> np.ndarray | float:
        m = self.model
        c = 0.5 if self.causal else 1.0
        return 6.0 * c * m.layers * np.square(length) * m.heads * m.d_head * self._recompute

    def compute_s(self, length: np.ndarray | float, size: int) -> np.ndarray | float:
        cl, m = self.cluster, self.model
        if cl.alpha1_ms is not None and cl.alpha2_ms is not None:
            return (cl.alpha1_ms * np.square(length) + cl.alpha2_ms * length) / size / 1e3
        linear = 6.0 * (m.linear_params + m.vocab * m.hidden) * length * self._recompute
        return (linear + self.attention_flops(length)) / size / self._flops_per_s

    def attention_s(self, length: np.ndarray | float, size: int) -> np.ndarray | float:
        """The attention share of :meth:`compute_s` (what ring communication can hide behind)."""
        cl = self.cluster
        if cl.alpha1_ms is not None:
            return cl.alpha1_ms * np.square(length) / size / 1e3
        return self.attention_flops(length) / size / self._flops_per_s

    # ---- communication ----
    @property
    def _passes(self) -> int:
        return 3 if self.model.checkpointing == "full" else 2

    def _bw(self, table: dict[int, float], n: int, spans_nodes: bool) -> float:
        if n in table:
            return table[n] * 1e9
        return (self.cluster.inter_gbs if spans_nodes else self.cluster.intra_gbs) * 1e9

    def a2a_s(self, length: np.ndarray | float, shape: GroupShape) -> np.ndarray | float:
        u = shape.ulysses
        if u == 1:
            return 0.0 * length
        m, cl = self.model, self.cluster
        spans = u > cl.gpus_per_node
        kv = max(m.n_kv_heads, u)
        per_gpu = length / shape.size * (2 * m.heads + 2 * kv) * m.d_head * m.bytes_per_value * (u - 1) / u
        return per_gpu * m.layers * self._passes / self._bw(cl.a2a_gbs, u, spans)

    def ring_exposed_s(self, length: np.ndarray | float, shape: GroupShape) -> np.ndarray | float:
        r, u = shape.ring, shape.ulysses
        if r == 1:
            return 0.0 * length
        m, cl = self.model, self.cluster
        spans = shape.size > cl.gpus_per_node
        kv = max(m.n_kv_heads, u)
        step_bytes = 2 * (length / r) * (kv / u) * m.d_head * m.bytes_per_value
        comm = step_bytes / self._bw(cl.p2p_gbs, r, spans)
        attn_fwd = self.attention_s(length, shape.size) / self._recompute / 3.0 / r / m.layers  # one fwd step
        fwd_steps = (r - 1) * (2 if m.checkpointing == "full" else 1)
        exposed = fwd_steps * np.maximum(0.0, comm - attn_fwd) + (2 * r - 1) * np.maximum(0.0, comm - 2 * attn_fwd)
        return m.layers * exposed

    def seq_time_s(self, length: np.ndarray | float, shape: GroupShape) -> np.ndarray | float:
        return self.compute_s(length, shape.size) + self.a2a_s(length, shape) + self.ring_exposed_s(length, shape)

    @property
    def beta_s(self) -> float:
        return self.cluster.beta_ms / 1e3

    def group_overhead_s(self, shape: GroupShape) -> float:
        """Fixed time of one group's micro-step: ``beta`` plus the latency of its collectives. A group runs
        all its sequences as one packed batch, so each all-to-all and ring step is paid once per layer and
        pass, not once per sequence."""
        m, cl = self.model, self.cluster
        spans = shape.size > cl.gpus_per_node
        lat = (cl.inter_latency_us if spans else cl.intra_latency_us) * 1e-6
        n = 0
        if shape.ulysses > 1:
            n += m.layers * self._passes * 4
        if shape.ring > 1:
            r = shape.ring
            n += m.layers * ((r - 1) * (2 if m.checkpointing == "full" else 1) + 2 * r - 1)
        return self.beta_s + n * lat

    # ---- memory ----
    @property
    def act_bytes_per_token(self) -> float:
        if self.cluster.act_bytes_per_token is not None:
            return self.cluster.act_bytes_per_token
        m = self.model
        b, h = m.bytes_per_value, m.hidden
        per_layer = {"full": 2 * h * b / 2, "selective": 34 * h * b / 2, "none": 34 * h * b / 2}[m.checkpointing]
        working = 34 * h * b / 2 if m.checkpointing == "full" else 0.0
        return m.layers * per_layer + working + 4 * m.vocab

    def states_gib(self) -> float:
        share = 1.0 / self.cluster.world if self.zero_stage == 3 else 1.0
        return self.model.params * 16 * share / GIB

    def tokens_capacity(self, size: int) -> float:
        """Tokens a group of ``size`` GPUs can hold in one micro-step."""
        free = (self.cluster.memory_gib - self.states_gib()) * GIB
        return max(0.0, free) / self.act_bytes_per_token * size

    def memory_gib(self, tokens: float, size: int) -> float:
        return self.states_gib() + self.act_bytes_per_token * tokens / size / GIB
