"""Hydra schemas: mutable twins of the frozen runtime dataclasses, registered in Hydra's ConfigStore.

Hydra cannot override fields of frozen dataclasses, so every frozen type gets a generated mutable twin with the
same fields and defaults; entry points convert back with :func:`freeze` after ``OmegaConf.to_object``.
Unknown keys are errors because every node is a structured config.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from planner.planner import PlannerConfig
from planner.types import Cluster, ModelShape
from trainer.config import DataConfig, EvalConfig, TrainConfig

_TWINS: dict[type, type] = {}


def twin(cls: type) -> type:
    """A mutable dataclass with the fields, types and defaults of the frozen dataclass ``cls``."""
    if cls not in _TWINS:
        hints = typing.get_type_hints(cls)
        fields: list[tuple[str, Any, Any]] = []
        for f in dataclasses.fields(cls):
            if hints[f.name] == dict[str, Any]:  # free-form (model.rope_scaling): an untyped node, so that
                fields.append((f.name, Any, field(default=None)))  # `key={a: 1}` replaces it whole
                continue
            hint = _listed(hints[f.name])
            if hint is not hints[f.name]:  # a tuple of configs or of pairs: a list in Hydra (default empty)
                fields.append((f.name, hint, field(default_factory=list)))
                continue
            if f.default is not dataclasses.MISSING:
                spec = field(default=f.default)
            elif f.default_factory is not dataclasses.MISSING:
                spec = field(default_factory=f.default_factory)
            else:
                spec = field(default="???")  # required: OmegaConf MISSING until a config sets it
            fields.append((f.name, hints[f.name], spec))
        _TWINS[cls] = dataclasses.make_dataclass(f"{cls.__name__}Schema", fields, kw_only=True)
    return _TWINS[cls]


def _listed(hint: Any) -> Any:
    """``tuple[SourceConfig, ...]`` -> ``list[its twin]``, ``tuple[tuple[int, int], ...]`` -> ``list[list[int]]``
    (OmegaConf types lists, not tuples of these); any other hint unchanged."""
    args: Any = typing.get_args(hint)
    if typing.get_origin(hint) is not tuple or len(args) != 2 or args[1] is not Ellipsis:
        return hint
    if isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return list.__class_getitem__(twin(args[0]))
    if typing.get_origin(args[0]) is tuple:
        return list.__class_getitem__(list.__class_getitem__(typing.get_args(args[0])[0]))
    return hint


def freeze(cls: type, obj: Any) -> Any:
    """Build the frozen ``cls`` from its twin instance (lists become tuples where the field is a tuple)."""
    return cls(**fields_of(cls, obj))


def fields_of(cls: type, obj: Any) -> dict[str, Any]:
    """The twin instance's field values as ``cls`` takes them."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if typing.get_origin(hints[f.name]) is tuple and isinstance(v, list):
            inner: Any = typing.get_args(hints[f.name])[0]
            v = tuple(freeze(inner, e) if isinstance(inner, type) and dataclasses.is_dataclass(inner) else e for e in v)
        if hints[f.name] == dict[str, Any]:
            v = dict(v or {})
        kwargs[f.name] = v
    return kwargs


def model_shape(obj: Any) -> ModelShape:
    """The model of a config node; with ``hf_path`` its architecture comes from the folder's config.json."""
    from models.hf.config import resolve

    return ModelShape(**resolve(fields_of(ModelShape, obj)))


ClusterSchema = twin(Cluster)
ModelSchema = twin(ModelShape)
PlannerSchema = twin(PlannerConfig)
DataSchema = twin(DataConfig)
TrainSchema = twin(TrainConfig)
EvalSchema = twin(EvalConfig)


@dataclass
class LengthsSchema:
    path: str | None = None  # .txt[.gz] (one length per line), .jsonl or .npy
    fixed: list[int] = field(default_factory=list)  # plan exactly this batch (one step)
    global_batch: int = 512  # sequences per sampled step (from lengths.path)
    steps: int = 20  # steps sampled from lengths.path
    max_len: int = 262144  # longest sequence of a sampled step (longer lengths: refused, or capped with clip)
    seed: int = 0  # the sampling of steps
    clip: bool = False  # cap lengths above max_len (logged) instead of refusing them
    max_len_schedule: list[list[int]] = field(default_factory=list)  # sp-train's data.max_len_schedule: per phase


@dataclass
class OutputSchema:
    format: str = "table"  # table | json
    picture: str | None = None  # PNG path: Gantt chart of the first step
    baselines: bool = True  # plan the static, oracle, Ulysses-hetero and greedy baselines too


@dataclass
class RunSchema:
    tokens: float = 0.0  # > 0: estimate a training run of this many tokens (summary.run); e.g. 2e11


@dataclass
class PlanJobSchema:
    cluster: Any = field(default_factory=ClusterSchema)
    model: Any = field(default_factory=ModelSchema)
    planner: Any = field(default_factory=PlannerSchema)
    lengths: LengthsSchema = field(default_factory=LengthsSchema)
    output: OutputSchema = field(default_factory=OutputSchema)
    run: RunSchema = field(default_factory=RunSchema)
    causal: bool = True
    train: Any = field(default_factory=TrainSchema)  # train.sharding: the same setting sp-train uses


@dataclass
class TrainJobSchema:
    cluster: Any = field(default_factory=ClusterSchema)
    model: Any = field(default_factory=ModelSchema)
    planner: Any = field(default_factory=PlannerSchema)
    data: Any = field(default_factory=DataSchema)
    train: Any = field(default_factory=TrainSchema)
    eval: Any = field(default_factory=EvalSchema)


ROOTS: dict[str, type] = {"plan": PlanJobSchema, "config": TrainJobSchema}  # config name -> its job schema


def register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="plan_schema", node=PlanJobSchema)
    cs.store(group="cluster", name="cluster_schema", node=ClusterSchema)
    cs.store(group="model", name="model_schema", node=ModelSchema)
    cs.store(group="planner", name="planner_schema", node=PlannerSchema)
    cs.store(name="train_schema", node=TrainJobSchema)
    cs.store(group="data", name="data_schema", node=DataSchema)
    cs.store(group="train", name="train_schema", node=TrainSchema)
