"""The step loader: documents of several sources mixed by weight, with a length schedule; deterministic from
the seed and resumable exactly.

- **Order.** Each source is a stream of its documents in a seeded permutation (seed, source name, epoch).
  When every document has been drawn, the source starts a new epoch with a new permutation (logged): a
  document never repeats within an epoch.
- **Mixing by tokens.** ``weight`` is a source's share of the training tokens (ProLong's convention). Each draw
  takes the next piece of the source furthest behind its share (smallest ``tokens / weight``; ties to the
  first source), so after any step every source's token count is within one document of its share. No random
  number is drawn for the mixing: the state is the per-source counters, and a resume is exact.
- **Steps.** A step takes pieces until the next one would exceed ``data.tokens_per_step`` (at least one).
- **Lengths.** A document longer than the step's limit (``data.max_len_schedule`` at that step, lowered by a
  source's own ``max_len``) is split into consecutive pieces sharing one token (each target trained once), or
  rejected with ``data.long_docs=reject``; one shorter than a source's ``min_len`` is skipped. Pieces of one
  document come one after another, and a document cut under one limit keeps being cut at the current one.

``state()`` / ``load_state()`` carry every counter through a checkpoint; :meth:`Mixture.counters` gives the
per-source documents, tokens and epochs that TensorBoard shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.config import DataConfig, SourceConfig
from trainer.data.corpus import Corpus, Piece, cut, name_key, target_weights

STATE_FORMAT = 2
COUNTERS = ("epoch", "cursor", "documents", "tokens", "split", "rejected")  # a stream's state besides ``rest``


@dataclass
class Stream:
    """One source's documents, epoch after epoch, cut into pieces on demand."""

    corpus: Corpus
    src: SourceConfig
    seed: int
    eligible: np.ndarray  # document indices it draws from (held-out and too-short ones removed)
    epoch: int = 0
    cursor: int = 0
    rest: tuple[int, int, int] | None = None  # (doc, start, end): the undrawn part of the current document
    documents: int = 0  # documents started, over the run
    tokens: int = 0  # training tokens (targets) drawn, over the run
    split: int = 0
    rejected: int = 0

    def __post_init__(self) -> None:
        self._order = self._perm()
        self.events: list[str] = []

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 0x50C, name_key(self.src.name), self.epoch]).permutation(
            len(self.eligible)
        )

    def peek(self, max_len: int, long_docs: str) -> Piece:
        """The next piece (not yet taken) under the limit ``max_len``."""
        cap = min(max_len, self.src.max_len or max_len)
        misses = 0
        while self.rest is None:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._perm()
                self.events.append(f"source {self.src.name!r} starts epoch {self.epoch + 1} (all "
                                   f"{len(self.eligible)} documents drawn once)")  # fmt: skip
            d = int(self.eligible[self._order[self.cursor]])
            self.cursor += 1
            n = int(self.corpus.sizes[d])
            if n - 1 > cap and long_docs == "reject":
                self.rejected += 1
                misses += 1
                if misses > len(self.eligible):
                    raise ValueError(f"source {self.src.name!r}: every document is longer than max_len={cap} "
                                     "and data.long_docs='reject'; raise the length or split them")  # fmt: skip
                continue
            self.documents += 1
            self.split += n - 1 > cap
            self.rest = (d, 0, n)
        d, a, n = self.rest
        return Piece(d, a, min(a + cap + 1, n))

    def take(self, p: Piece) -> np.ndarray:
        self.tokens += p.length
        d, _, n = self.rest  # type: ignore[misc]
        self.rest = (d, p.end - 1, n) if n - (p.end - 1) >= 2 else None
        return cut(self.corpus, p)

    def state(self) -> dict:
        return {k: getattr(self, k) for k in COUNTERS} | {"rest": list(self.rest) if self.rest else None}

    def load_state(self, st: dict) -> None:
        for key in COUNTERS:
            setattr(self, key, int(st[key]))
        self.rest = tuple(st["rest"]) if st["rest"] else None  # type: ignore[assignment]
        self._order = self._perm()


def prompt_length(doc: np.ndarray) -> int:
    """Tokens before the first trained target of a document (all of it when none is trained)."""
    trained = np.flatnonzero(target_weights(doc))
    return int(trained[0]) + 1 if len(trained) else len(doc)


class Mixture:
    """``next_step()``: the token arrays of the next step's pieces (each >= 2 tokens, each with a trained
    target: a piece that is all prompt is dropped, its tokens still counted against the step's budget, so a
    step can come back empty)."""

    def __init__(self, corpora: list[Corpus], cfg: DataConfig, exclude: list[np.ndarray] | None = None) -> None:
        self.cfg = cfg
        self.streams: list[Stream] = []
        self.skipped: dict[str, int] = {}
        for i, c in enumerate(corpora):
            keep = np.ones(len(c), dtype=bool)
            if exclude is not None:
                keep[exclude[i]] = False
            short = c.sizes - 1 < max(1, c.src.min_len)
            self.skipped[c.src.name] = int((keep & short).sum())
            eligible = np.flatnonzero(keep & ~short)
            if len(eligible) == 0:
                raise ValueError(f"source {c.src.name!r} has no document to train on: {len(c)} documents, "
                                 f"{int((~keep).sum())} held out, {self.skipped[c.src.name]} shorter than "
                                 f"min_len={c.src.min_len}")  # fmt: skip
            self.streams.append(Stream(c, c.src, cfg.seed, eligible))
        w = np.array([s.src.weight for s in self.streams], dtype=np.float64)
        self.weights = w / w.sum()
        self.step = 0  # the step the next call draws
        self.events: list[str] = []  # what changed (epochs, the length limit), for rank 0 to log
        self.untrained: dict[str, list[int]] = {}  # per source: prompt lengths of dropped pieces (the last few)

    def next_step(self) -> list[np.ndarray]:
        max_len = self.cfg.max_len_at(self.step)
        if self.step and max_len != self.cfg.max_len_at(self.step - 1):
            self.events.append(f"data.max_len {self.cfg.max_len_at(self.step - 1)} -> {max_len} at step "
                               f"{self.step} (data.max_len_schedule)")  # fmt: skip
        docs: list[np.ndarray] = []
        used = 0
        live = np.flatnonzero(self.weights > 0)
        while True:
            behind = [self.streams[i].tokens / self.weights[i] for i in live]
            stream = self.streams[int(live[int(np.argmin(behind))])]
            p = stream.peek(max_len, self.cfg.long_docs)
            if used and used + p.length > self.cfg.tokens_per_step:
                break
            piece = stream.take(p)
            used += p.length
            if target_weights(piece).any():
                docs.append(piece)
            else:  # all prompt (a masked prompt longer than max_len): nothing to learn, dropped before planning
                seen = self.untrained.setdefault(stream.src.name, [])
                seen[:] = [*seen[-7:], prompt_length(stream.corpus.doc(p.doc))]
        for s in self.streams:
            self.events += [f"{e} at step {self.step}" for e in s.events]
            s.events.clear()
        self.step += 1
        return docs

    def untrained_report(self) -> str:
        """The sources of dropped pieces with no trained target and their documents' prompt lengths."""
        return "; ".join(f"source {n!r}: prompts of {sorted(set(v))} tokens" for n, v in self.untrained.items())

    def describe(self, held_out: list[int]) -> list[str]:
        """One line per source (kind, path, documents, tokens, weight, held-out and skipped counts), and the
        length schedule."""
        out = []
        for s, w, h in zip(self.streams, self.weights, held_out, strict=True):
            c, src = s.corpus, s.src
            out.append(f"data source {src.name!r} ({src.source}{', ' + src.path if src.path else ''}): {len(c)} "
                       f"documents, {int(c.sizes.sum())} tokens, weight {w:.3f}" + (f", {h} held out" if h else "")
                       + (f", {self.skipped[src.name]} shorter than min_len={src.min_len} skipped" if src.min_len
                          else ""))  # fmt: skip
        if self.cfg.max_len_schedule:
            out.append(f"data.max_len_schedule {[list(e) for e in self.cfg.max_len_schedule]}: "
                       f"max_len {self.cfg.max_len_at(self.step)} at step {self.step}")  # fmt: skip
        return out

    def take_events(self) -> list[str]:
        out, self.events = self.events, []
        return out

    @property
    def corpora(self) -> list[Corpus]:
        return [s.corpus for s in self.streams]

    @staticmethod
    def counters(state: dict) -> dict[str, float]:
        """Per source of a :meth:`state`: documents started, training tokens and the epoch (1-based), for
        TensorBoard."""
        out: dict[str, float] = {}
        for n, s in state.get("sources", {}).items():
            out |= {f"data/{n}/documents": s["documents"], f"data/{n}/tokens": s["tokens"],
                    f"data/{n}/epoch": s["epoch"] + 1}  # fmt: skip
        return out

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "step": self.step, "sources": {s.src.name: s.state() for s in self.streams}}

    def load_state(self, st: dict, step: int) -> None:
        """Continue from a checkpoint of training step ``step`` (the step the next call draws)."""
        self.step = step
        if st.get("format") != STATE_FORMAT:  # an earlier version's single-source position
            epoch = int(st.get("epoch", 0)) + 1
            for s in self.streams:
                s.epoch, s.cursor, s.rest = epoch, 0, None
                s._order = s._perm()
            self.events.append(f"WARNING: the checkpoint's data position is from an earlier loader version; the "
                               f"data order restarts with a fresh epoch ({epoch + 1})")  # fmt: skip
            return
        missing = [s.src.name for s in self.streams if s.src.name not in st["sources"]]
        if missing:
            raise ValueError(f"the checkpoint's data position has no source {missing} (it has "
                             f"{sorted(st['sources'])})")  # fmt: skip
        if int(st["step"]) != step:
            raise ValueError(f"the checkpoint's data position is for step {st['step']}, not {step}")
        for s in self.streams:
            s.load_state(st["sources"][s.src.name])
