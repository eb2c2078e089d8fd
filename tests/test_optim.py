"""Issue 19 (optimiser and schedule a recipe needs): AdamW betas/eps, no-decay parameter groups, cosine / wsd /
constant schedules against hand-computed values, the statement a resume with another step count prints."""

from __future__ import annotations

import math
import re

import pytest
import torch

from trainer.config import TrainConfig
from trainer.optim import build, kind, lr_at, param_groups, schedule_change


def test_schedules_against_hand_computed_values():
    cos = TrainConfig(steps=10, lr=1.0, min_lr=0.0, warmup_steps=2)
    assert [lr_at(s, cos) for s in (0, 1)] == [0.5, 1.0]  # linear warmup
    assert lr_at(2, cos) == 1.0 and lr_at(6, cos) == pytest.approx(0.5)  # half way through the cosine: 0.5
    assert lr_at(10, cos) == pytest.approx(0.0) and lr_at(99, cos) == pytest.approx(0.0)
    wsd = TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2, schedule="wsd", decay_fraction=0.3)
    # stable at 1.0 from step 2 to 6; steps 7, 8, 9 decay linearly over the last 3 steps towards 0.1
    assert [lr_at(s, wsd) for s in range(2, 7)] == [1.0] * 5
    assert [round(lr_at(s, wsd), 6) for s in (7, 8, 9)] == [1.0, 0.7, 0.4]
    assert lr_at(10, wsd) == pytest.approx(0.1)
    const = TrainConfig(steps=10, lr=0.3, min_lr=0.0, warmup_steps=3, schedule="constant")
    assert [round(lr_at(s, const), 6) for s in (0, 2, 3, 9)] == [0.1, 0.3, 0.3, 0.3]
    plain = TrainConfig(steps=7, lr=2e-3, min_lr=1e-4, warmup_steps=1)  # the formula this project used before
    for s in range(1, 7):
        want = 1e-4 + 0.5 * (2e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 1) / 6))
        assert lr_at(s, plain) == pytest.approx(want, rel=1e-12)


def test_no_decay_groups_by_parameter_kind():
    model = torch.nn.Module()
    model.embedding = torch.nn.Module()
    model.embedding.word_embeddings = torch.nn.Embedding(10, 4)
    layer = torch.nn.Module()
    layer.input_layernorm = torch.nn.LayerNorm(4)  # weight and bias
    layer.linear_qkv = torch.nn.Linear(4, 12)  # weight and bias
    model.layer = layer
    model.output_layer = torch.nn.Linear(4, 10, bias=False)
    kinds = {n: kind(n, p) for n, p in model.named_parameters()}
    assert kinds == {"embedding.word_embeddings.weight": "embedding", "layer.input_layernorm.weight": "norm",
                     "layer.input_layernorm.bias": "bias", "layer.linear_qkv.weight": None,
                     "layer.linear_qkv.bias": "bias", "output_layer.weight": None}  # fmt: skip
    groups = param_groups(model, 0.1, ("norm", "bias", "embedding"))
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups] == [
        (0.1, ["layer.linear_qkv.weight", "output_layer.weight"]),
        (0.0, ["embedding.word_embeddings.weight", "layer.input_layernorm.bias", "layer.input_layernorm.weight",
               "layer.linear_qkv.bias"]),
    ]  # fmt: skip
    assert [g["weight_decay"] for g in param_groups(model, 0.1, ())] == [0.1]  # default: everything decays
    opt = build(model, TrainConfig(beta1=0.8, beta2=0.95, eps=1e-6, no_weight_decay=("norm",)), cuda=False)
    assert [(g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
        ((0.8, 0.95), 1e-6, 0.01),
        ((0.8, 0.95), 1e-6, 0.0),
    ]


def test_no_decay_step_leaves_excluded_parameters_untouched_by_decay():
    """One AdamW step with zero gradients: only weight decay moves a parameter, by exactly lr * wd * p."""
    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    model = torch.nn.Module()
    model.linear = torch.nn.Module()
    model.linear.weight, model.linear.bias = w, b
    opt = build(model, TrainConfig(lr=0.1, weight_decay=0.5, no_weight_decay=("bias",)), cuda=False)
    w.grad, b.grad = torch.zeros(3), torch.zeros(3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.1 * 0.5)) and torch.equal(b.detach(), torch.ones(3))


def test_a_changed_step_count_states_how_the_schedule_changes():
    old = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    msg = schedule_change(old, TrainConfig(steps=200, lr=1e-3, min_lr=1e-4, warmup_steps=10), 50)
    assert msg is not None and "train.steps 100 -> 200 at step 50: the cosine schedule is recomputed" in msg
    assert re.search(r"lr at this step 0\.000\d+ -> 0\.000\d+", msg) and "at step 200 instead of 100" in msg
    assert schedule_change(old, old, 50) is None
    const = TrainConfig(steps=100, schedule="constant")
    assert "unchanged" in schedule_change(const, TrainConfig(steps=300, schedule="constant"), 50)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schedule", "linear", "train.schedule='linear'; valid: ['cosine', 'wsd', 'constant']"),
        ("no_weight_decay", ("norms",), "unknown ['norms']; valid: any of ['norm', 'bias', 'embedding']"),
        ("beta2", 1.0, "train.beta2=1.0; valid: a number in [0, 1)"),
        ("eps", 0.0, "train.eps=0.0; valid: a finite number > 0"),
        ("decay_fraction", 0.0, "train.decay_fraction=0.0; valid: a number in (0, 1]"),
    ],
)
def test_bad_optimiser_options_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{field: value})


def test_model_flops_and_mfu_by_hand():
    """MFU counts 6 x (linear params + V h) per token plus each document's own attention: the standard count,
    12 c L^2 H d per layer (forward 4, backward 8; c = 1/2 causal)."""
    from planner.cost import CostModel
    from planner.types import Cluster, ModelShape

    m = ModelShape(name="t", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256)
    cost = CostModel(Cluster(name="c", nodes=1, gpus_per_node=4, peak_tflops=1.0), m)
    lengths = [100, 3000]
    linear = 6 * (m.linear_params + 256 * 64) * 3100
    attention = sum(12 * 0.5 * 2 * n * n * 4 * 16 for n in lengths)  # per document: packing adds no cross terms
    assert cost.model_flops(lengths) == pytest.approx(linear + attention, rel=1e-12)
    assert cost.mfu(lengths, 2.0, 4) == pytest.approx((linear + attention) / (2.0 * 4 * 1e12), rel=1e-12)
