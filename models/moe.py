"""Mixture-of-experts layers: megatron-core's ``MoELayer`` (sequential experts, all-gather dispatcher, no expert
parallelism) with the Hugging Face model's router, and the load-balancing loss over a micro-step's tokens.

**Router** (:class:`SPRouter`, megatron-core's ``TopKRouter`` with its gating and routing replaced): logits
``x @ W_r.T`` in the hidden dtype, softmax in fp32, top-k, the top-k probabilities renormalised when
``norm_topk_prob`` (Qwen3-MoE's setting; Mixtral always), cast back to the hidden dtype: exactly
transformers' ``Qwen3MoeTopKRouter`` and ``MixtralTopKRouter``. Routing is per token, so every SP strategy
stays exact. (megatron-core's own ``gating`` moves the weight to CUDA and its fused GEMM needs Transformer
Engine; neither is wanted here.)

**Load-balancing loss**, as transformers defines it (``load_balancing_loss_func``): over all MoE layers and
rows, with C_e the top-k assignments and S_e the summed router probabilities of expert e and R = layers x
rows, ``aux = E sum_e (C_e / R)(S_e / R)``, added to the loss as ``router_aux_loss_coef x aux``. Here the rows
are the micro-step's tokens on every rank and group (SP padding and idle ranks' dummy tokens excluded): each
router records C and S during the forward, :func:`finish` all-reduces them once per micro-step, and each
router's backward adds ``coef w E C_e / R^2`` to the gradient of its probabilities (through the softmax),
which is the exact gradient of the global loss; micro-steps are weighted by their share ``w`` of the step's
tokens (one micro-step: transformers' loss on the same batch). The aux loss is reported on its own; the
language-model loss is what is logged as the loss. Recomputation (activation checkpointing, offload, the
tiled MLP) re-runs routers after :func:`finish`: they record nothing then and their backward adds the same
gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter


class MoEStep:
    """One micro-step's routing statistics (per MoE layer slot) and, after :func:`finish`, the aux gradient."""

    def __init__(self, valid: torch.Tensor | None, weight: float, layers: int, experts: int, coef: float) -> None:
        self.valid = valid  # [local rows] bool on the device; None: no row counts (an idle rank's dummy token)
        self.weight, self.layers, self.experts, self.coef = weight, layers, experts, coef
        self.counts: list[torch.Tensor] = []  # per router call in the forward: [E] top-k assignments
        self.prob_sums: list[torch.Tensor] = []  # [E] summed probabilities (detached)
        self.open = True  # recording; closed by finish (recomputes then record nothing)
        self.grad_scale: torch.Tensor | None = None  # [E]: coef w E C_e / R^2, set by finish
        self.aux: torch.Tensor | None = None  # this micro-step's aux loss (weighted by w, 0-d), set by finish


class SPRouter(TopKRouter):
    """megatron-core's router interface with the Hugging Face routing (see the module docstring)."""

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        x = input.reshape(-1, input.shape[-1])  # [s, b, h] -reshape-> [s b, h]
        logits = torch.nn.functional.linear(x, self.weight.to(x.dtype))  # [tokens, E]
        step: MoEStep | None = getattr(self, "sp_step", None)
        if step is not None and torch.is_grad_enabled():
            logits = _AuxGradient.apply(logits, step)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, self.topk, dim=-1)  # [tokens, k]
        if self.config.sp_norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        top = top.to(logits.dtype)
        if step is not None and step.open:
            _record(step, probs.detach(), idx)
        dense = torch.zeros_like(logits).scatter(1, idx, top)  # [tokens, E]: zero outside the top-k
        routing_map = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(1, idx, True)
        return dense, routing_map


def _record(step: MoEStep, probs: torch.Tensor, idx: torch.Tensor) -> None:
    valid = step.valid if step.valid is not None else torch.zeros(probs.shape[0], dtype=torch.bool,
                                                                    device=probs.device)  # fmt: skip
    w = valid.to(torch.float32)[:, None]  # [tokens, 1]
    hits = torch.zeros_like(probs).scatter(1, idx, 1.0)  # [tokens, E]: 1 where routed
    step.counts.append((hits * w).sum(0))
    step.prob_sums.append((probs * w).sum(0))


class _AuxGradient(torch.autograd.Function):
    """Identity on the router logits; its backward adds the load-balancing loss's gradient (valid rows only)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, step: MoEStep) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.step = step
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        step: MoEStep = ctx.step
        if step.grad_scale is None or step.valid is None:
            return grad, None
        (logits,) = ctx.saved_tensors
        p = torch.softmax(logits.float(), dim=-1)  # [tokens, E]
        g = step.grad_scale[None, :]  # d aux / d probability, the same for every row
        d_logits = p * (g - (p * g).sum(-1, keepdim=True))  # through the softmax
        d_logits = d_logits * step.valid.to(torch.float32)[:, None]
        return grad + d_logits.to(grad.dtype), None


def routers(model: torch.nn.Module) -> list[SPRouter]:
    """The model's routers, in layer order (recorded at install; no module walk per micro-step)."""
    found: list[SPRouter] = getattr(model, "sp_routers", None) or [
        m for m in model.modules() if isinstance(m, SPRouter)
    ]
    model.sp_routers = found  # type: ignore[assignment]
    return found


def begin(model: torch.nn.Module, valid: torch.Tensor | None, weight: float) -> MoEStep | None:
    """Open a micro-step's statistics on every router (``valid``: the local rows that are tokens; ``weight``:
    the micro-step's share of the step's tokens)."""
    rs = routers(model)
    if not rs:
        return None
    cfg = rs[0].config
    step = MoEStep(valid, weight, len(rs), cfg.num_moe_experts, cfg.sp_router_aux_loss_coef)
    for r in rs:
        r.sp_step = step
    return step


def finish(step: MoEStep | None, group: dist.ProcessGroup | None = None, device: torch.device | None = None,
           layers: int = 0, experts: int = 0) -> None:  # fmt: skip
    """Collective over ``group`` (every rank that took part in the micro-step, an idle one with ``step=None``
    and the model's MoE ``layers`` and ``experts``): the global statistics, the aux loss and its gradient."""
    if step is not None:
        step.open = False
        layers, experts = step.layers, step.experts
        dev = step.counts[0].device if step.counts else device
        c = torch.stack(step.counts).sum(0) if step.counts else torch.zeros(experts, device=dev)
        s = torch.stack(step.prob_sums).sum(0) if step.prob_sums else torch.zeros(experts, device=dev)
        rows = step.valid.sum().float().reshape(1) if step.valid is not None else torch.zeros(1, device=dev)
    else:
        c, s, rows = (torch.zeros(n, device=device) for n in (experts, experts, 1))
    total = torch.cat([c, s, rows])  # [2E + 1]
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    if step is None:
        return
    c, s, rows = total[:experts], total[experts : 2 * experts], total[-1]
    r = (rows * layers).clamp_min(1.0)
    step.grad_scale = step.coef * step.weight * experts * c / r**2
    step.aux = step.weight * experts * (c * s).sum() / r**2  # 0 without rows (c = s = 0): no host sync


def current(model: torch.nn.Module) -> MoEStep | None:
    """The micro-step :func:`begin` opened (None for a dense model)."""
    rs = routers(model)
    return rs[0].sp_step if rs else None


def end(model: torch.nn.Module) -> None:
    """No micro-step open: routers record nothing and add no gradient (evaluation, a plain forward)."""
    for r in routers(model):
        r.sp_step = None
