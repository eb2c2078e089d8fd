"""The configuration reference (``docs/config.md``), generated from the schema: every key of every config group
with its type, default and meaning (the comment on its line in the dataclass, or the lines above it).

``python -m cli.config_reference > docs/config.md`` writes it; ``tests/test_cli.py`` fails when the committed file
and the schema disagree.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

from cli.schema import LengthsSchema, OutputSchema, RunSchema
from planner.planner import PlannerConfig
from planner.types import Cluster, ModelShape
from trainer.config import DataConfig, EvalConfig, SourceConfig, TrainConfig

GROUPS: list[tuple[str, type, str]] = [
    ("cluster", Cluster, "`cluster=NAME` picks `configs/cluster/NAME.yaml`; sp-train and sp-plan"),
    ("model", ModelShape, "`model=NAME` picks `configs/model/NAME.yaml`; sp-train and sp-plan"),
    ("planner", PlannerConfig, "`configs/planner/default.yaml`; sp-train and sp-plan"),
    ("data", DataConfig, "`data=NAME` picks `configs/data/NAME.yaml`; sp-train"),
    ("data.sources[]", SourceConfig, "one entry of `data.sources` (a mixture); sp-train"),
    ("train", TrainConfig, "`configs/train/default.yaml`; sp-train (sp-plan reads `train.sharding`)"),
    ("eval", EvalConfig, "`configs/config.yaml`'s eval section; sp-train and sp-eval"),
    ("lengths", LengthsSchema, "the batches sp-plan plans (`configs/plan.yaml`); sp-plan only"),
    ("output", OutputSchema, "what sp-plan prints and draws; sp-plan only"),
    ("run", RunSchema, "sp-plan's training-run estimate; sp-plan only"),
]


def comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the ``# ...`` ending its line, else the comment lines right above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    field_at: dict[int, str] = {}  # line -> the field defined on it
    comment_at: dict[int, tuple[int, str]] = {}  # line -> (column, comment text)
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        row, col = tok.start
        if tok.type == tokenize.NAME and col == 4 and tok.string in names and row not in field_at:
            field_at[row] = tok.string
        elif tok.type == tokenize.COMMENT:
            comment_at[row] = (col, tok.string.lstrip("#").strip())
    out: dict[str, str] = {}
    for row, name in field_at.items():
        if row in comment_at:
            out[name] = comment_at[row][1]
            continue
        above: list[str] = []
        r = row - 1
        while r in comment_at and comment_at[r][0] == 4 and r not in field_at:
            above.insert(0, comment_at[r][1])
            r -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _type(hint: Any) -> str:
    text = str(hint).replace("typing.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return repr(list(value) if isinstance(value, tuple) else value)
    return "required"


def render() -> str:
    lines = ["# Configuration reference", "",
             "Every key sp-train and sp-plan accept, by group: its type, its default (the dataclass's; a config file "
             "may set another, e.g. `configs/cluster/h100x64.yaml`) and what it means. Override any of them on the "
             "command line (`train.steps=100`, `'planner.checkpointing=[full,offload]'`); an unknown key is an error "
             "that names the closest valid ones. Generated from the schema by `python -m cli.config_reference` "
             "(`tests/test_cli.py` fails when this file and the code disagree).", ""]  # fmt: skip
    for group, cls, where in GROUPS:
        hints = typing.get_type_hints(cls)
        notes = comments(cls)
        lines += [f"## `{group}`", "", where + ".", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = notes.get(f.name, "").replace("|", "\\|")
            default = _default(f).replace("|", "\\|")
            kind = _type(hints[f.name]).replace("|", "\\|")
            lines.append(f"| `{group}.{f.name}` | `{kind}` | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
