"""Documents of one source, by index: variable-length, never concatenated and chunked.

Kinds (``source``): the Python standard library's own ``.py`` files (``stdlib``: real code with long-tailed
lengths, no download), the Python documentation's help topics (``pydoc``: short English text, also embedded),
a glob of text files, a JSONL file with a text field, or a megatron-core indexed dataset (``.bin``/``.idx``,
from ``sp-data prepare`` or Megatron's preprocess tool; memory-mapped, never tokenised at start). Tokens are
bytes (vocab 256) unless a Hugging Face ``tokenizers`` file or model folder is named.

A document of n tokens is one training sequence of n - 1 (inputs ``t[:-1]``, targets ``t[1:]``).

Loss masks: a JSONL row ``{"prompt": ..., "completion": ...}`` is the two encoded one after the other and
trains only on the completion's tokens; a row with the text field and ``"loss_mask": [0/1 per token]`` trains
on the tokens marked 1; an indexed dataset ``PREFIX`` with a ``PREFIX_lossmask`` twin (uint8, one per token,
written by ``sp-data prepare``) carries its masks. Such a document is a :class:`MaskedDoc` (``token_mask[j]``:
token j is a trained target); the step's loss is normalised by the step's trained targets
(:func:`trained_targets`).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import SourceConfig

LARGE_JSONL = 1 << 30  # bytes: above this a JSONL source gets a warning to prepare it
MASK_SUFFIX = "_lossmask"  # PREFIX_lossmask.bin/.idx: the loss-mask channel of indexed dataset PREFIX


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


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str) -> Any:
    from tokenizers import Tokenizer

    from trainer.tokenizer import tokenizer_file

    return Tokenizer.from_file(str(tokenizer_file(spec)))


def encoder(tokenizer: str | None) -> Callable[[str], np.ndarray]:
    """text -> int64 token ids: the tokenizer's, or UTF-8 bytes when ``tokenizer`` is None."""
    if tokenizer is None:
        return lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    tok = _tokenizer(tokenizer)
    return lambda text: np.asarray(tok.encode(text).ids, dtype=np.int64)


def row_tokens(row: object, text_field: str, where: str, encode: Callable[[str], np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """One JSONL row -> (tokens, bool mask per token or None). Bad rows are errors naming ``where`` (file and
    row) and the field: a prompt without a completion, a mask of the wrong length or with other values than
    0/1, a mask that trains nothing, a missing text field."""
    if isinstance(row, dict) and "prompt" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                got = type(row.get(key)).__name__ if key in row else "missing"
                raise ValueError(f"{where}: field {key!r} is {got}; a prompt row needs string 'prompt' and "
                                 "'completion' fields")  # fmt: skip
        if not row["completion"]:
            raise ValueError(f"{where}: field 'completion' is empty (a prompt-only row trains on nothing)")
        p, c = encode(row["prompt"]), encode(row["completion"])  # encoded apart: only the completion trains
        return np.concatenate([p, c]), np.arange(len(p) + len(c)) >= len(p)
    if not isinstance(row, dict) or text_field not in row:
        keys = sorted(row)[:5] if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where} has no field {text_field!r} (keys {keys}; or 'prompt' + 'completion')")
    if not isinstance(row[text_field], str):
        raise ValueError(f"{where}: field {text_field!r} is {type(row[text_field]).__name__}; valid: a string")
    tokens = encode(row[text_field])
    if "loss_mask" not in row:
        return tokens, None
    mask = row["loss_mask"]
    if not isinstance(mask, list) or any(m not in (0, 1) or isinstance(m, float) for m in mask):
        raise ValueError(f"{where}: field 'loss_mask' must be a list of 0/1 per token")
    if len(mask) != len(tokens):
        raise ValueError(f"{where}: field 'loss_mask' has {len(mask)} entries for a document of {len(tokens)} "
                         f"tokens (field {text_field!r}); valid: one 0/1 per token")  # fmt: skip
    if not any(mask[1:]):
        raise ValueError(f"{where}: field 'loss_mask' marks no target (the first token is never one)")
    return tokens, np.asarray(mask, dtype=bool)


def json_row(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e.msg})") from None


def stdlib_files() -> list[str]:
    return sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py"), recursive=True))


def pydoc_topics() -> list[str]:
    """The help topics of the Python documentation (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


class Corpus:
    """The documents of one source; ``sizes[i]`` is document i's token count, ``trained`` the trained targets
    of the whole source where loss masks exist (else None)."""

    def __init__(self, src: SourceConfig, tokenizer: str | None = None) -> None:
        self.src = src
        self._encode = encoder(tokenizer)
        self._bytes = tokenizer is None
        self._indexed: Any = None
        self._masks: Any = None
        self._docs: list[np.ndarray] | None = None  # held in memory (JSONL, pydoc)
        self._files: list[str] = []
        self.trained: int | None = None
        self.sizes: np.ndarray
        where = f"source {src.name!r} (source={src.source!r}, path={src.path!r})"
        if src.source == "stdlib":
            self._files = stdlib_files()
        elif src.source == "glob":
            self._files = sorted(glob.glob(src.path or "", recursive=True))
        elif src.source == "pydoc":
            self._docs = [self._encode(t) for t in pydoc_topics()]
        elif src.source == "jsonl":
            self._docs = self._read_jsonl(src.path or "", where)
        else:
            self._open_indexed(src.path or "", where)
        if self._indexed is not None:
            self.sizes = np.asarray(self._indexed.sequence_lengths, dtype=np.int64)
        elif self._docs is not None:
            self.sizes = np.array([len(d) for d in self._docs], dtype=np.int64)
        elif self._bytes:
            self.sizes = np.array([Path(f).stat().st_size for f in self._files], dtype=np.int64)
        else:
            self.sizes = np.array([len(self.doc(i)) for i in range(len(self._files))], dtype=np.int64)
        if len(self.sizes) == 0 or self.sizes.max() < 2:
            raise ValueError(f"{where} holds no document of >= 2 tokens; point its path at real data or use "
                             "source=stdlib")  # fmt: skip

    def _read_jsonl(self, path: str, where: str) -> list[np.ndarray]:
        if not Path(path).is_file():
            raise ValueError(f"{where}: JSONL file not found")
        size = Path(path).stat().st_size
        if size > LARGE_JSONL and os.environ.get("RANK", "0") == "0":
            print(f"[sp-train] WARNING: {where} is {size / 2**30:.1f} GiB of JSONL: every rank tokenises it at "
                  "start; `sp-data prepare` it once and train on source=indexed", file=sys.stderr)  # fmt: skip
        docs, masked = [], False
        with open(path) as f:
            for n, line in enumerate(f):
                if line.strip():
                    tokens, mask = row_tokens(json_row(line, f"{path}:{n + 1}"), self.src.text_field,
                                              f"{path}:{n + 1}", self._encode)  # fmt: skip
                    masked |= mask is not None
                    docs.append(tokens if mask is None else with_mask(tokens, mask))
        if masked:
            self.trained = trained_targets(docs)
        return docs

    def _open_indexed(self, prefix: str, where: str) -> None:
        if not Path(prefix + ".idx").is_file() or not Path(prefix + ".bin").is_file():
            raise ValueError(f"{where}: no indexed dataset (expected {prefix}.bin and {prefix}.idx)")
        self._indexed = open_indexed(prefix, where)
        if Path(prefix + MASK_SUFFIX + ".idx").is_file():
            self._masks = open_indexed(prefix + MASK_SUFFIX, where)
            if not np.array_equal(self._masks.sequence_lengths, self._indexed.sequence_lengths):
                raise ValueError(f"{where}: {prefix}{MASK_SUFFIX} does not match {prefix} document by document "
                                 "(re-run sp-data prepare)")  # fmt: skip
            meta = Path(prefix + ".json")
            if meta.is_file():
                self.trained = json.loads(meta.read_text()).get("trained_targets")
            else:  # a mask channel written by other tools: counted from the bytes (the resume fingerprint uses it)
                self.trained = _mask_targets(prefix + MASK_SUFFIX + ".bin", self._masks.sequence_lengths)

    def __len__(self) -> int:
        return len(self.sizes)

    def files(self) -> list[str]:
        """The files whose bytes this source reads (none for stdlib and pydoc: part of the Python install)."""
        if self.src.source in ("stdlib", "pydoc"):
            return []
        if self._indexed is not None:
            prefix = self.src.path or ""
            twins = [prefix, prefix + MASK_SUFFIX] if self._masks is not None else [prefix]
            return [p + ext for p in twins for ext in (".idx", ".bin")]
        return [self.src.path or ""] if self.src.source == "jsonl" else list(self._files)

    def doc(self, i: int) -> np.ndarray:
        if self._indexed is not None:
            tokens = np.asarray(self._indexed[i], dtype=np.int64)
            return tokens if self._masks is None else with_mask(tokens, np.asarray(self._masks[i], dtype=bool))
        if self._docs is not None:
            return self._docs[i]
        raw = Path(self._files[i]).read_bytes()
        if self._bytes:
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        return self._encode(raw.decode("utf-8", errors="replace"))


def open_indexed(prefix: str, where: str) -> Any:
    """megatron-core's IndexedDataset of ``prefix``, checked before use: an index that cannot be read, or a
    ``.bin`` whose size is not the one the index describes (truncated, or from another dataset), is a
    ValueError naming the files."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        ds = IndexedDataset(prefix)
    except Exception as e:  # struct/assertion/numpy errors from a damaged index, whatever their kind
        raise ValueError(f"{where}: {prefix}.idx is damaged ({type(e).__name__}: {e}); re-run sp-data "
                         "prepare") from None  # fmt: skip
    ix = ds.index
    need = (
        int(ix.sequence_pointers[-1]) + int(ix.sequence_lengths[-1]) * ix.dtype_size if len(ix.sequence_lengths) else 0
    )
    have = Path(prefix + ".bin").stat().st_size
    if have != need:
        raise ValueError(f"{where}: {prefix}.bin holds {have} bytes but {prefix}.idx describes {need} (truncated, "
                         "or the two files come from different datasets); re-run sp-data prepare")  # fmt: skip
    return ds


def _mask_targets(path: str, lengths: np.ndarray) -> int:
    """Trained targets of a uint8 mask channel: the marked tokens, less each document's first (never a target)."""
    flat = np.memmap(path, dtype=np.uint8, mode="r")  # [all tokens]: the documents' masks, concatenated
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    return int(np.count_nonzero(flat)) - int(np.count_nonzero(flat[starts]))


@dataclass(frozen=True)
class Piece:
    doc: int
    start: int
    end: int  # token slice [start, end) of the document; training length end - start - 1

    @property
    def length(self) -> int:
        return self.end - self.start - 1


def pieces_of(n: int, max_len: int) -> list[tuple[int, int]]:
    """Token slices of a document of ``n`` tokens split at ``max_len`` training tokens: consecutive pieces
    share one token (the last input of one is the first of the next), so each target is trained once."""
    return [(a, min(a + max_len + 1, n)) for a in range(0, n - 1, max_len) if min(a + max_len + 1, n) - a >= 2]


def cut(corpus: Corpus, p: Piece) -> np.ndarray:
    """The tokens of piece ``p`` (with its part of the document's loss mask)."""
    doc = corpus.doc(p.doc)
    mask = getattr(doc, "token_mask", None)
    piece = doc[p.start : p.end]
    return piece if mask is None else with_mask(piece, mask[p.start : p.end])


def doc_pieces(corpus: Corpus, docs: np.ndarray | list[int], max_len: int, long_docs: str) -> list[np.ndarray]:
    """The pieces of documents ``docs`` in order, split (or, with ``long_docs='reject'``, dropped) at
    ``max_len`` as training would: what validation evaluates."""
    out = []
    for i in docs:
        n = int(corpus.sizes[i])
        if n >= 2 and (n - 1 <= max_len or long_docs == "split"):
            out += [cut(corpus, Piece(int(i), a, b)) for a, b in pieces_of(n, max_len)]
    return out


def held_out(corpus: Corpus, fraction: float, seed: int) -> np.ndarray:
    """The documents held out for validation (sorted indices; at least one when ``fraction`` > 0): a fixed
    draw from the data seed and the source's name, so training never sees them and every run with that seed
    holds out the same."""
    n_docs = len(corpus)
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n_docs - 1, max(1, round(fraction * n_docs)))
    return np.sort(np.random.default_rng([seed, 0x5E1D, name_key(corpus.src.name)]).permutation(n_docs)[:k])


def name_key(name: str) -> int:
    """A stable integer of a source's name (seeds its random streams: reordering sources changes nothing)."""
    import zlib

    return zlib.crc32(name.encode())
