"""Variable-length documents (no concat-and-chunk) and a deterministic, resumable step loader.

Sources: the Python standard library's own ``.py`` files (the embedded default: real code with long-tailed
lengths, no download), a glob of text files, a JSONL file with a text field, or a Megatron indexed dataset
(``.bin``/``.idx`` from Megatron's preprocess tool, read with megatron-core's ``IndexedDataset``). Tokens are
bytes (vocab 256) unless a Hugging Face ``tokenizers`` file or model folder is named.

A document of n tokens is one training sequence of n - 1 (inputs ``t[:-1]``, targets ``t[1:]``). Documents
longer than ``max_len + 1`` are split into pieces (each target predicted once) or rejected, with a count.

Loss masks (JSONL): a row ``{"prompt": ..., "completion": ...}`` is the two encoded one after the other and
trains only on the completion's tokens; a row with the text field and ``"loss_mask": [0/1 per token]`` trains
on the tokens marked 1. Such a document is a :class:`MaskedDoc` (its ``token_mask[j]``: token j is a trained
target); the step's loss is normalised by the trained targets of the whole step (:func:`trained_targets`).
"""

from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config import DataConfig


class MaskedDoc(np.ndarray):
    """Token ids with ``token_mask`` (bool per token: trained as a target). Make one with :func:`with_mask`;
    a slice of one is unmasked, so cut tokens and mask together."""

    token_mask: np.ndarray | None = None


def with_mask(tokens: np.ndarray, token_mask: np.ndarray) -> np.ndarray:
    doc: MaskedDoc = tokens.view(MaskedDoc)
    doc.token_mask = np.asarray(token_mask, dtype=bool)
    return doc


def target_weights(doc: np.ndarray) -> np.ndarray:
    """bool per target (``doc[1:]``): True where the target is trained (bool: it is saved for backward)."""
    mask = getattr(doc, "token_mask", None)
    return np.ones(len(doc) - 1, dtype=bool) if mask is None else mask[1:].astype(bool)


def trained_targets(docs: list[np.ndarray]) -> int:
    """How many targets of these documents are trained (the step's loss divisor)."""
    masks = [getattr(d, "token_mask", None) for d in docs]
    return int(sum(len(d) - 1 if m is None else int(m[1:].sum()) for d, m in zip(docs, masks, strict=True)))


@dataclass(frozen=True)
class Row:
    """One JSONL row: plain text, text with a per-token loss mask, or a prompt and its completion."""

    text: str = ""
    prompt: str | None = None
    loss_mask: tuple[int, ...] | None = None


class Corpus:
    """Documents by index; ``sizes[i]`` is document i's token count."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self._tok = None
        if cfg.tokenizer:
            from tokenizers import Tokenizer

            from trainer.tokenizer import tokenizer_file

            self._tok = Tokenizer.from_file(str(tokenizer_file(cfg.tokenizer)))
        self._indexed = None
        self._rows: list[Row] | None = None
        self.trained: int | None = None  # trained targets of the whole corpus, where loss masks exist
        self._files: list[str] = []
        if cfg.source == "stdlib":
            self._files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py"), recursive=True))
        elif cfg.source == "glob":
            self._files = sorted(glob.glob(cfg.path or "", recursive=True))
        elif cfg.source == "jsonl":
            self._rows = self._read_jsonl(cfg.path)
        else:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            if not cfg.path or not Path(cfg.path + ".idx").exists():
                raise ValueError(f"data.path={cfg.path!r}: no Megatron indexed dataset (expected PREFIX.bin/.idx)")
            self._indexed = IndexedDataset(cfg.path)
        if self._indexed is not None:
            self.sizes = np.asarray(self._indexed.sequence_lengths, dtype=np.int64)
        elif self._rows is not None:
            docs = [self.doc(i) for i in range(len(self._rows))]
            self.sizes = np.array([len(d) for d in docs], dtype=np.int64)
            if any(r.prompt is not None or r.loss_mask is not None for r in self._rows):
                self.trained = trained_targets(docs)
        elif self._tok is None:
            self.sizes = np.array([Path(f).stat().st_size for f in self._files], dtype=np.int64)
        else:
            self.sizes = np.array([len(self.doc(i)) for i in range(len(self._files))], dtype=np.int64)
        if len(self.sizes) == 0 or self.sizes.max() < 2:
            raise ValueError(
                f"data source {cfg.source!r} (path={cfg.path!r}) holds no document of >= 2 tokens; "
                "point data.path at real data or use data.source=stdlib"
            )

    def _read_jsonl(self, path: str | None) -> list[Row]:
        if not path or not Path(path).exists():
            raise ValueError(f"data.path={path!r}: JSONL file not found")
        rows = []
        with open(path) as f:
            for n, line in enumerate(f):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n + 1}: not a JSON object ({e.msg})") from None
                    rows.append(self._row(row, f"{path}:{n + 1}"))
        return rows

    def _row(self, row: object, where: str) -> Row:
        field = self.cfg.text_field
        if isinstance(row, dict) and "prompt" in row:
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str):
                    got = type(row.get(key)).__name__ if key in row else "missing"
                    raise ValueError(f"{where}: field {key!r} is {got}; a prompt row needs string 'prompt' and "
                                     "'completion' fields")  # fmt: skip
            if not row["completion"]:
                raise ValueError(f"{where}: field 'completion' is empty (a prompt-only row trains on nothing)")
            return Row(text=row["completion"], prompt=row["prompt"])
        if not isinstance(row, dict) or field not in row:
            keys = sorted(row)[:5] if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{where} has no field {field!r} (keys {keys}; or 'prompt' + 'completion')")
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field {field!r} is {type(row[field]).__name__}; valid: a string")
        if "loss_mask" not in row:
            return Row(text=row[field])
        mask = row["loss_mask"]
        if not isinstance(mask, list) or any(m not in (0, 1) or isinstance(m, float) for m in mask):
            raise ValueError(f"{where}: field 'loss_mask' must be a list of 0/1 per token")
        n = len(self._encode(row[field]))
        if len(mask) != n:
            raise ValueError(f"{where}: field 'loss_mask' has {len(mask)} entries for a document of {n} tokens "
                             f"(field {field!r}); valid: one 0/1 per token")  # fmt: skip
        if not any(mask[1:]):
            raise ValueError(f"{where}: field 'loss_mask' marks no target (the first token is never one)")
        return Row(text=row[field], loss_mask=tuple(mask))

    def _encode(self, text: str) -> np.ndarray:
        if self._tok is not None:
            return np.asarray(self._tok.encode(text).ids, dtype=np.int64)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def doc(self, i: int) -> np.ndarray:
        if self._indexed is not None:
            return np.asarray(self._indexed[i], dtype=np.int64)
        if self._rows is not None:
            row = self._rows[i]
            if row.prompt is not None:  # prompt then completion, encoded apart: only the completion trains
                p, c = self._encode(row.prompt), self._encode(row.text)
                return with_mask(np.concatenate([p, c]), np.arange(len(p) + len(c)) >= len(p))
            tokens = self._encode(row.text)
            return tokens if row.loss_mask is None else with_mask(tokens, np.asarray(row.loss_mask, dtype=bool))
        raw = Path(self._files[i]).read_bytes()
        if self._tok is None:
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        return self._encode(raw.decode("utf-8", errors="replace"))


@dataclass(frozen=True)
class Piece:
    doc: int
    start: int
    end: int  # token slice [start, end) of the document; training length end - start - 1

    @property
    def length(self) -> int:
        return self.end - self.start - 1


def held_out(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """The documents held out for validation (sorted indices; at least one when ``fraction`` > 0): a fixed
    draw from the data seed, so training never sees them and every run with that seed holds out the same."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n_docs - 1, max(1, round(fraction * n_docs)))
    return np.sort(np.random.default_rng([seed, 0x5E1D]).permutation(n_docs)[:k])


def pieces(corpus: Corpus, max_len: int, long_docs: str, exclude: np.ndarray | None = None
           ) -> tuple[list[Piece], int, int]:  # fmt: skip
    """Every trainable piece (documents in ``exclude`` left out), plus how many were split and rejected."""
    out, split, rejected = [], 0, 0
    skip = set(exclude.tolist()) if exclude is not None else set()
    for i, n in enumerate(corpus.sizes.tolist()):
        if n < 2 or i in skip:
            continue
        if n - 1 <= max_len:
            out.append(Piece(i, 0, n))
        elif long_docs == "reject":
            rejected += 1
        else:
            split += 1
            for a in range(0, n - 1, max_len):
                if min(a + max_len + 1, n) - a >= 2:
                    out.append(Piece(i, a, min(a + max_len + 1, n)))
    return out, split, rejected


def cut(corpus: Corpus, p: Piece) -> np.ndarray:
    """The tokens of piece ``p`` (with its part of the document's loss mask)."""
    doc = corpus.doc(p.doc)
    mask = getattr(doc, "token_mask", None)
    piece = doc[p.start : p.end]
    return piece if mask is None else with_mask(piece, mask[p.start : p.end])


class StepLoader:
    """Deterministic order from a seed; each step takes pieces until its token budget is reached.

    ``state()`` / ``load_state()`` make the position part of a checkpoint.
    """

    def __init__(self, corpus: Corpus, cfg: DataConfig, exclude: np.ndarray | None = None) -> None:
        self.corpus, self.cfg = corpus, cfg
        self.items, self.split, self.rejected = pieces(corpus, cfg.max_len, cfg.long_docs, exclude)
        if not self.items:
            raise ValueError(
                f"no trainable document: all {len(corpus)} rejected as longer than data.max_len={cfg.max_len}"
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._perm()

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, self.epoch]).permutation(len(self.items))

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, st: dict) -> None:
        self.epoch, self.cursor = int(st["epoch"]), int(st["cursor"])
        self._order = self._perm()

    def next_step(self) -> list[np.ndarray]:
        """Token arrays of the next step's pieces (each >= 2 tokens)."""
        docs: list[np.ndarray] = []
        used = 0
        while True:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._perm()
            p = self.items[int(self._order[self.cursor])]
            if docs and used + p.length > self.cfg.tokens_per_step:
                return docs
            self.cursor += 1
            docs.append(cut(self.corpus, p))
            used += p.length


def fingerprint(corpus: Corpus) -> dict:
    """What a checkpoint records of its training data: per source, its path, document count, total tokens
    and a hash of the size table (the same content under the same tokenizer gives the same fingerprint)."""
    import xxhash

    cfg = corpus.cfg
    path = str(Path(sysconfig.get_paths()["stdlib"])) if cfg.source == "stdlib" else cfg.path
    return {"sources": [{
        "source": cfg.source, "path": path, "documents": len(corpus), "tokens": int(corpus.sizes.sum()),
        "sizes_xxh3_128": xxhash.xxh3_128(np.ascontiguousarray(corpus.sizes, dtype=np.int64).tobytes()).hexdigest(),
        **({"trained_targets": corpus.trained} if corpus.trained is not None else {}),
    }]}  # fmt: skip


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Each difference as ``source i (path): field old -> new``; empty when the data is the same."""
    olds, news = old.get("sources", []), new.get("sources", [])
    if len(olds) != len(news):
        return [f"number of sources: {len(olds)} -> {len(news)}"]
    out = []
    for i, (a, b) in enumerate(zip(olds, news, strict=True)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"source {i} ({b.get('path') or a.get('path')}): {key} {a.get(key)!r} -> {b.get(key)!r}")
    return out
