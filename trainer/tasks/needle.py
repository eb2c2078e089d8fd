"""Needle retrieval tasks (needle-in-a-haystack, RULER's niah_multikey and niah_multivalue), built with the run's
tokenizer from filler documents, deterministic per seed.

A task of ``length`` tokens at ``depth`` (0 = the start of the haystack, 1 = its end): filler tokens, the
queried needle ``The special magic number for <key> is: <value>.`` inserted at that depth, ``needles - 1``
distractor needles (other keys) at random depths, and at the end the query and its answer:
``What is the special magic number for <key>? The special magic number for <key> is: <value>``. With
``values > 1`` the queried key has that many needles (each its own value), the first at the depth and the
others after it, and the answer lists the values in order of appearance, joined by ", ". The answer's tokens are
the targets: position p is right when the model's argmax at p - 1 is the token at p (teacher-forced), and a
task is right when all its targets are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEYS = ("apple", "river", "candle", "violet", "harbor", "meadow", "falcon", "copper", "lantern", "orchid", "pebble",
        "thunder", "willow", "saffron", "glacier", "compass", "ember", "juniper", "marble", "nectar", "quartz",
        "raven", "summit", "tundra", "velvet", "walnut", "zephyr", "basil", "cobalt", "dune")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class NeedleConfig:
    """``eval.needle``: the grid and the variant (RULER: niah_single = 1 needle, 1 value; niah_multikey =
    several needles; niah_multivalue = several values for the queried key)."""

    lengths: tuple[int, ...] = ()  # task lengths in tokens; () = data.max_len and its halves down to 1/8
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 2  # tasks per (length, depth) cell
    needles: int = 1  # key-value needles in the haystack (the queried one and needles - 1 distractors)
    values: int = 1  # values of the queried key (each its own needle)
    digits: int = 6  # digits of each value
    filler: str = ""  # the source whose held-out (or eval) documents fill the haystack; "" = all of them
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(x) for x in self.lengths))
        object.__setattr__(self, "depths", tuple(float(x) for x in self.depths))
        if any(x < 64 for x in self.lengths):
            raise ValueError(f"eval.needle.lengths={list(self.lengths)}; valid: token counts >= 64")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"eval.needle.depths={list(self.depths)}; valid: a non-empty list of fractions in [0, 1]")
        for name, lo in (("samples", 1), ("needles", 1), ("values", 1), ("digits", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"eval.needle.{name}={getattr(self, name)}; valid: an integer >= {lo}")
        if self.needles > len(KEYS):
            raise ValueError(f"eval.needle.needles={self.needles}; valid: 1 to {len(KEYS)} (distinct keys)")

    def grid_lengths(self, max_len: int) -> tuple[int, ...]:
        return self.lengths or tuple(max_len // k for k in (8, 4, 2, 1) if max_len // k >= 64)


@dataclass(frozen=True)
class NeedleTask:
    length: int
    depth: float
    input_ids: np.ndarray  # [length] int64: haystack, needles, query, answer
    targets: tuple[int, ...]  # positions p of the answer's tokens (predicted at p - 1)

    def to_json(self) -> str:
        return json.dumps({"length": self.length, "depth": self.depth, "input_ids": self.input_ids.tolist(),
                           "targets": list(self.targets)})  # fmt: skip

    @staticmethod
    def from_json(line: str, where: str) -> NeedleTask:
        try:
            row = json.loads(line)
            ids = np.asarray(row["input_ids"], dtype=np.int64)
            targets = tuple(int(p) for p in row["targets"])
            task = NeedleTask(int(row["length"]), float(row["depth"]), ids, targets)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a needle task ({e}); valid: a JSON object with length, depth, input_ids, "
                             "targets") from None  # fmt: skip
        if not targets or min(targets) < 1 or max(targets) >= len(ids):
            raise ValueError(f"{where}: targets {list(targets)[:8]} must lie in 1..{len(ids) - 1} (predicted at p - 1)")
        return task


def build_tasks(cfg: NeedleConfig, lengths: Sequence[int], filler: list[np.ndarray],
                encode: Callable[[str], np.ndarray]) -> list[NeedleTask]:  # fmt: skip
    """Every (length, depth, sample) task, in that order; ``filler`` documents (token arrays) are concatenated
    and read from a per-task offset."""
    pool = np.concatenate([np.asarray(d, dtype=np.int64) for d in filler]) if filler else np.zeros(0, np.int64)
    if len(pool) == 0:
        raise ValueError("eval.tasks=[needle] needs filler documents: set eval.holdout > 0 or eval.sources (or "
                         "eval.needle.filler to a source with documents)")  # fmt: skip
    out = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(cfg.depths):
            for s in range(cfg.samples):
                rng = np.random.default_rng([cfg.seed, li, di, s])
                out.append(_task(cfg, int(length), depth, pool, encode, rng))
    return out


def _task(cfg: NeedleConfig, length: int, depth: float, pool: np.ndarray, encode: Callable[[str], np.ndarray],
          rng: np.random.Generator) -> NeedleTask:  # fmt: skip
    keys = [KEYS[i] for i in rng.choice(len(KEYS), size=cfg.needles, replace=False)]
    key = keys[0]
    values = [str(int(rng.integers(10 ** (cfg.digits - 1), 10**cfg.digits))) for _ in range(cfg.values)]
    needle = lambda k, v: encode(f" The special magic number for {k} is: {v}. ")  # noqa: E731
    inserts = [needle(key, v) for v in values]
    inserts += [needle(k, str(int(rng.integers(10 ** (cfg.digits - 1), 10**cfg.digits)))) for k in keys[1:]]
    query = encode(f" What is the special magic number for {key}? The special magic number for {key} is:")
    answer = encode(" " + ", ".join(values))
    room = length - len(query) - len(answer) - sum(len(x) for x in inserts)
    if room < 0:
        raise ValueError(f"eval.needle: a task of {length} tokens cannot hold its needles, query and answer "
                         f"({length - room} tokens); valid: longer lengths, fewer needles or values")  # fmt: skip
    start = int(rng.integers(0, max(1, len(pool) - room)))
    hay = np.resize(np.roll(pool, -start), room)  # the filler from a random offset (repeated if short)
    at = [int(round(depth * room))]  # the queried key's first needle at the depth, its other values after it
    at += sorted(int(x) for x in rng.integers(at[0], room + 1, size=cfg.values - 1))
    at += [int(x) for x in rng.integers(0, room + 1, size=cfg.needles - 1)]  # distractors anywhere
    pieces, prev = [], 0
    for pos, ins in sorted(zip(at, range(len(inserts))), key=lambda t: (t[0], t[1])):
        pieces += [hay[prev:pos], inserts[ins]]
        prev = pos
    pieces += [hay[prev:], query, answer]
    ids = np.concatenate(pieces).astype(np.int64)
    assert len(ids) == length
    return NeedleTask(length, depth, ids, tuple(range(length - len(answer), length)))


def write_tasks(tasks: list[NeedleTask], path: str | Path) -> None:
    Path(path).write_text("".join(t.to_json() + "\n" for t in tasks))


def read_tasks(path: str | Path) -> list[NeedleTask]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--tasks-in {p}: no such file (a JSON-lines task file, as --tasks-out writes)")
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"--tasks-in {p}: empty")
    return [NeedleTask.from_json(ln, f"{p}:{i + 1}") for i, ln in enumerate(lines)]


@dataclass(frozen=True)
class NeedleGrid:
    """Accuracy and mean target log-probability per (length, depth) cell: rows by length, columns by depth."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    accuracy: tuple[tuple[float, ...], ...]
    logprob: tuple[tuple[float, ...], ...]
    samples: int

    @staticmethod
    def of_sums(tasks: list[NeedleTask], sums: np.ndarray) -> NeedleGrid:
        """``sums`` [n, 3] per task: targets right, targets counted, log-probability sum."""
        missing = [i for i, t in enumerate(tasks) if sums[i, 1] != len(t.targets)]
        if missing:
            raise AssertionError(f"tasks {missing[:5]} scored {sums[missing[0], 1]:.0f} of their targets")
        return NeedleGrid.of(tasks, sums[:, 0] == sums[:, 1], sums[:, 2] / np.maximum(sums[:, 1], 1))

    @staticmethod
    def of(tasks: list[NeedleTask], right: np.ndarray, logprob: np.ndarray) -> NeedleGrid:
        """``right`` [n] bool (every target right), ``logprob`` [n] (mean over the task's targets)."""
        lengths = tuple(sorted({t.length for t in tasks}))
        depths = tuple(sorted({t.depth for t in tasks}))
        acc = np.full((len(lengths), len(depths)), np.nan)
        lp = np.full_like(acc, np.nan)
        count = np.zeros_like(acc)
        for t, r, p in zip(tasks, right, logprob, strict=True):
            i, j = lengths.index(t.length), depths.index(t.depth)
            acc[i, j] = (0 if count[i, j] == 0 else acc[i, j]) + float(r)
            lp[i, j] = (0 if count[i, j] == 0 else lp[i, j]) + float(p)
            count[i, j] += 1
        acc, lp = acc / np.maximum(count, 1), lp / np.maximum(count, 1)
        as_rows = lambda a: tuple(tuple(float(x) for x in row) for row in a)  # noqa: E731
        return NeedleGrid(lengths, depths, as_rows(acc), as_rows(lp), int(count.max()) if count.size else 0)

    @property
    def mean_accuracy(self) -> float:
        return float(np.nanmean(np.array(self.accuracy)))

    @property
    def mean_logprob(self) -> float:
        return float(np.nanmean(np.array(self.logprob)))

    def json(self) -> dict:
        cells = lambda g: [[None if np.isnan(x) else x for x in r] for r in g]  # noqa: E731 - null: an empty cell
        return {"task": "needle", "lengths": list(self.lengths), "depths": list(self.depths),
                "accuracy": cells(self.accuracy), "logprob": cells(self.logprob),
                "samples": self.samples, "mean_accuracy": self.mean_accuracy,
                "mean_logprob": self.mean_logprob}  # fmt: skip

    def scalars(self) -> dict[str, float]:
        out = {"needle/accuracy": self.mean_accuracy, "needle/logprob": self.mean_logprob}
        for i, n in enumerate(self.lengths):
            for j, d in enumerate(self.depths):
                out[f"needle/accuracy_len{n}_depth{round(100 * d)}"] = self.accuracy[i][j]
        return out

    def heatmap(self, title: str):  # -> matplotlib figure
        """Accuracy (left) and the mean log-probability of the targets (right) by length and depth."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(2.4 + 1.8 * len(self.depths), 1.4 + 0.55 * len(self.lengths)))
        lp = np.array(self.logprob)
        lo = float(np.nanmin(lp)) if np.isfinite(lp).any() else -1.0
        panels = ((axes[0], np.array(self.accuracy), "accuracy", 0.0, 1.0, "RdYlGn"),
                  (axes[1], lp, "target log-prob", min(lo, -1e-3), 0.0, "viridis"))  # fmt: skip
        for ax, grid, name, vmin, vmax, cmap in panels:
            im = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
            ax.set_xticks(range(len(self.depths)), [f"{round(100 * d)}%" for d in self.depths])
            ax.set_yticks(range(len(self.lengths)), [_tokens(n) for n in self.lengths])
            for i in range(len(self.lengths)):
                for j in range(len(self.depths)):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xlabel("needle depth")
            ax.set_ylabel("length (tokens)")
            fig.colorbar(im, ax=ax, label=name)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        return fig


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
