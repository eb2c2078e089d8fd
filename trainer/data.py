"""Variable-length documents (no concat-and-chunk) and a deterministic, resumable step loader.

Sources: the Python standard library's own ``.py`` files (the embedded default: real code with long-tailed
lengths, no download), a glob of text files, a JSONL file with a text field, or a Megatron indexed dataset
(``.bin``/``.idx`` from Megatron's preprocess tool, read with megatron-core's ``IndexedDataset``). Tokens are
bytes (vocab 256) unless a Hugging Face ``tokenizers`` file or model folder is named.

A document of n tokens is one training sequence of n - 1 (inputs ``t[:-1]``, targets ``t[1:]``). Documents
longer than ``max_len + 1`` are split into pieces (each target predicted once) or rejected, with a count.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config import DataConfig


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
        self._texts: list[str] | None = None
        self._files: list[str] = []
        if cfg.source == "stdlib":
            self._files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py"), recursive=True))
        elif cfg.source == "glob":
            self._files = sorted(glob.glob(cfg.path or "", recursive=True))
        elif cfg.source == "jsonl":
            self._texts = self._read_jsonl(cfg.path)
        else:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            if not cfg.path or not Path(cfg.path + ".idx").exists():
                raise ValueError(f"data.path={cfg.path!r}: no Megatron indexed dataset (expected PREFIX.bin/.idx)")
            self._indexed = IndexedDataset(cfg.path)
        if self._indexed is not None:
            self.sizes = np.asarray(self._indexed.sequence_lengths, dtype=np.int64)
        elif self._texts is not None:
            self.sizes = np.array([len(self._encode(t)) for t in self._texts], dtype=np.int64)
        elif self._tok is None:
            self.sizes = np.array([Path(f).stat().st_size for f in self._files], dtype=np.int64)
        else:
            self.sizes = np.array([len(self.doc(i)) for i in range(len(self._files))], dtype=np.int64)
        if len(self.sizes) == 0 or self.sizes.max() < 2:
            raise ValueError(
                f"data source {cfg.source!r} (path={cfg.path!r}) holds no document of >= 2 tokens; "
                "point data.path at real data or use data.source=stdlib"
            )

    def _read_jsonl(self, path: str | None) -> list[str]:
        if not path or not Path(path).exists():
            raise ValueError(f"data.path={path!r}: JSONL file not found")
        texts = []
        with open(path) as f:
            for n, line in enumerate(f):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n + 1}: not a JSON object ({e.msg})") from None
                    if not isinstance(row, dict) or self.cfg.text_field not in row:
                        keys = sorted(row)[:5] if isinstance(row, dict) else type(row).__name__
                        raise ValueError(f"{path}:{n + 1} has no field {self.cfg.text_field!r} (keys {keys})")
                    if not isinstance(row[self.cfg.text_field], str):
                        raise ValueError(
                            f"{path}:{n + 1}: field {self.cfg.text_field!r} is "
                            f"{type(row[self.cfg.text_field]).__name__}; valid: a string"
                        )
                    texts.append(row[self.cfg.text_field])
        return texts

    def _encode(self, text: str) -> np.ndarray:
        if self._tok is not None:
            return np.asarray(self._tok.encode(text).ids, dtype=np.int64)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def doc(self, i: int) -> np.ndarray:
        if self._indexed is not None:
            return np.asarray(self._indexed[i], dtype=np.int64)
        if self._texts is not None:
            return self._encode(self._texts[i])
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


def pieces(corpus: Corpus, max_len: int, long_docs: str) -> tuple[list[Piece], int, int]:
    """Every trainable piece, plus how many documents were split and rejected."""
    out, split, rejected = [], 0, 0
    for i, n in enumerate(corpus.sizes.tolist()):
        if n < 2:
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


class StepLoader:
    """Deterministic order from a seed; each step takes pieces until its token budget is reached.

    ``state()`` / ``load_state()`` make the position part of a checkpoint.
    """

    def __init__(self, corpus: Corpus, cfg: DataConfig) -> None:
        self.corpus, self.cfg = corpus, cfg
        self.items, self.split, self.rejected = pieces(corpus, cfg.max_len, cfg.long_docs)
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
            docs.append(self.corpus.doc(p.doc)[p.start : p.end])
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
