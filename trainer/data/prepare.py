"""``sp-data prepare``: text or JSONL -> a tokenised corpus in megatron-core's indexed format, in parallel,
resumable, with an optional loss-mask channel.

The inputs are cut into chunks (``chunk_rows`` JSONL rows, or text files, each); worker processes tokenise a
chunk each and write it with megatron-core's ``IndexedDatasetBuilder`` to ``PREFIX.parts/chunk_K`` (tokens)
and ``chunk_K_lossmask`` (uint8, one per token), then a ``chunk_K.done`` marker, last and atomically. A rerun
with the same inputs and settings (``PREFIX.parts/plan.json``) keeps every finished chunk and does the rest,
so an interrupted preparation costs at most the chunks in flight. The finished chunks are merged in order
(``add_index``) into ``PREFIX.bin/.idx``, plus ``PREFIX_lossmask.bin/.idx`` when a row has a mask (prompt and
completion rows, or ``loss_mask``; :func:`trainer.data.corpus.row_tokens` reads them exactly as training
reads JSONL), and ``PREFIX.json`` (counts, tokenizer, inputs). Training reads the result memory-mapped
(``source=indexed``), so no rank tokenises at start.
"""

from __future__ import annotations

import glob
import gzip
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from trainer.data.corpus import MASK_SUFFIX


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]  # files or glob patterns: *.jsonl[.gz] rows, any other file one document
    output: str  # PREFIX: writes PREFIX.bin/.idx (+ PREFIX_lossmask.bin/.idx) and PREFIX.json
    tokenizer: str | None = None  # a tokenizers JSON file or a Hugging Face folder; None = bytes
    text_field: str = "text"
    workers: int = 4
    chunk_rows: int = 2000  # JSONL rows (or text files) per work unit


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str  # the input file (JSONL) or "" (text files: each item of ``items`` is a path)
    items: tuple[str, ...]  # JSONL lines or text file paths
    rows: tuple[int, ...]  # 1-based line numbers of the JSONL lines in ``path`` (for error messages)
    nbytes: int


def input_files(patterns: tuple[str, ...]) -> list[str]:
    files: list[str] = []
    for p in patterns:
        found = sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else [p]
        missing = [f for f in found if not Path(f).is_file()]
        if not found or missing:
            raise ValueError(f"input {p!r}: no such file{'s' if not found else ''} ({missing or 'no match'})")
        files += found
    return files


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))


def _open(path: str) -> IO[str]:
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)  # noqa: SIM115 - closed by the caller


def chunks(files: list[str], chunk_rows: int) -> Iterator[Chunk]:
    """Work units in a fixed order: the same inputs and ``chunk_rows`` always give the same chunks."""
    k = 0
    texts = [f for f in files if not _is_jsonl(f)]
    for f in files:
        if not _is_jsonl(f):
            continue
        with _open(f) as fh:
            lines: list[str] = []
            rows: list[int] = []
            for n, line in enumerate(fh, 1):
                if line.strip():
                    lines.append(line)
                    rows.append(n)
                if len(lines) == chunk_rows:
                    yield Chunk(k, f, tuple(lines), tuple(rows), sum(len(x) for x in lines))
                    k, lines, rows = k + 1, [], []
            if lines:
                yield Chunk(k, f, tuple(lines), tuple(rows), sum(len(x) for x in lines))
                k += 1
    for a in range(0, len(texts), chunk_rows):
        part = tuple(texts[a : a + chunk_rows])
        yield Chunk(k, "", part, (), sum(Path(t).stat().st_size for t in part))
        k += 1


def token_dtype(tokenizer: str | None) -> type[np.number]:
    """megatron-core's choice: uint16 below 65,500 ids, int32 above."""
    if tokenizer is None:
        return np.uint16
    from trainer.data.corpus import _tokenizer

    return np.uint16 if _tokenizer(tokenizer).get_vocab_size() < 65500 else np.int32


def _work(job: tuple[Chunk, str, str | None, str]) -> dict[str, Any]:
    """Worker: tokenise one chunk and write it (tokens, mask, then the done marker)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from trainer.data.corpus import encoder, json_row, row_tokens

    chunk, parts, tokenizer, text_field = job
    encode = encoder(tokenizer)
    name = f"{parts}/chunk_{chunk.index:06d}"
    tok = IndexedDatasetBuilder(f"{name}.tmp.bin", dtype=token_dtype(tokenizer))
    msk = IndexedDatasetBuilder(f"{name}{MASK_SUFFIX}.tmp.bin", dtype=np.uint8)
    docs = tokens = trained = 0
    masked = False
    for i, item in enumerate(chunk.items):
        if chunk.path:
            where = f"{chunk.path}:{chunk.rows[i]}"
            ids, mask = row_tokens(json_row(item, where), text_field, where, encode)
        else:
            ids, mask = encode(Path(item).read_bytes().decode("utf-8", errors="replace")), None
        if len(ids) < 2:
            continue  # a document of < 2 tokens trains nothing (as in training)
        masked |= mask is not None
        mask = np.ones(len(ids), dtype=bool) if mask is None else mask
        tok.add_item(torch.from_numpy(ids))
        tok.end_document()
        msk.add_item(torch.from_numpy(mask.astype(np.uint8)))
        msk.end_document()
        docs, tokens, trained = docs + 1, tokens + len(ids), trained + int(mask[1:].sum())
    tok.finalize(f"{name}.tmp.idx")
    msk.finalize(f"{name}{MASK_SUFFIX}.tmp.idx")
    for base in (name, name + MASK_SUFFIX):
        for ext in ("bin", "idx"):
            os.replace(f"{base}.tmp.{ext}", f"{base}.{ext}")
    body = {"documents": docs, "tokens": tokens, "trained_targets": trained, "masked": masked, "nbytes": chunk.nbytes}
    Path(f"{name}.done.tmp").write_text(json.dumps(body))
    os.replace(f"{name}.done.tmp", f"{name}.done")
    return {"index": chunk.index, **body}


def _plan(cfg: PrepareConfig, files: list[str]) -> dict[str, Any]:
    """What decides the chunks' contents: a rerun keeps finished chunks only when this is unchanged."""
    stat = [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size, "mtime_ns": Path(f).stat().st_mtime_ns}
            for f in files]  # fmt: skip
    return {"inputs": stat, "tokenizer": cfg.tokenizer, "text_field": cfg.text_field, "chunk_rows": cfg.chunk_rows}


def prepare(cfg: PrepareConfig, progress: bool = True, stop_after: int = 0) -> dict[str, Any]:
    """Prepare ``cfg.output``; returns the summary written to ``PREFIX.json``. ``stop_after`` > 0 stops after
    that many newly written chunks (a deterministic interruption for tests), returning None as ``output``."""
    if cfg.workers < 1 or cfg.chunk_rows < 1:
        raise ValueError(f"--workers={cfg.workers}, --chunk-rows={cfg.chunk_rows}; valid: integers >= 1")
    files = input_files(cfg.inputs)
    out = Path(cfg.output)
    if not out.parent.is_dir():
        raise ValueError(f"--output {cfg.output!r}: folder {str(out.parent)!r} does not exist")
    parts = Path(f"{cfg.output}.parts")
    plan = _plan(cfg, files)
    if parts.is_dir() and (parts / "plan.json").is_file():
        if json.loads((parts / "plan.json").read_text()) != plan:
            raise ValueError(f"{parts} holds a preparation of other inputs or settings; remove it (or use another "
                             "--output) to start over")  # fmt: skip
    else:
        parts.mkdir(exist_ok=True)
        (parts / "plan.json").write_text(json.dumps(plan))
    t0 = time.perf_counter()
    done = {int(p.name[6:12]): json.loads(p.read_text()) for p in parts.glob("chunk_*.done")}
    reused, results = len(done), dict(done)
    todo = (c for c in chunks(files, cfg.chunk_rows) if c.index not in done)
    total = sum(Path(f).stat().st_size for f in files)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=sum(d["nbytes"] for d in done.values()), unit="B", unit_scale=True,
                   desc="sp-data prepare", dynamic_ncols=True)  # fmt: skip
    written = 0
    ctx = mp.get_context("spawn")
    with ctx.Pool(cfg.workers) as pool:
        for r in pool.imap_unordered(_work, ((c, str(parts), cfg.tokenizer, cfg.text_field) for c in todo)):
            results[r["index"]] = r
            written += 1
            if bar is not None:
                bar.update(r["nbytes"])
            if stop_after and written >= stop_after:
                pool.terminate()
                return {"output": None, "chunks_written": written, "chunks_reused": reused}
    if bar is not None:
        bar.close()
    summary = _merge(cfg, parts, results, files)
    summary |= {"chunks_written": written, "chunks_reused": reused, "seconds": round(time.perf_counter() - t0, 3)}
    return summary


def _merge(cfg: PrepareConfig, parts: Path, results: dict[int, dict], files: list[str]) -> dict[str, Any]:
    """Concatenate the chunks in order with ``add_index`` (tokens, and the masks when any row has one)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    order = sorted(results)
    masked = any(results[k]["masked"] for k in order)
    for suffix, dtype in [("", token_dtype(cfg.tokenizer))] + ([(MASK_SUFFIX, np.uint8)] if masked else []):
        target = cfg.output + suffix
        builder = IndexedDatasetBuilder(f"{target}.tmp.bin", dtype=dtype)
        for k in order:
            builder.add_index(f"{parts}/chunk_{k:06d}{suffix}")
        builder.finalize(f"{target}.tmp.idx")
        for ext in ("bin", "idx"):
            os.replace(f"{target}.tmp.{ext}", f"{target}.{ext}")
    if not masked:
        for ext in ("bin", "idx"):
            Path(f"{cfg.output}{MASK_SUFFIX}.{ext}").unlink(missing_ok=True)
    summary = {
        "output": cfg.output, "documents": sum(results[k]["documents"] for k in order),
        "tokens": sum(results[k]["tokens"] for k in order), "chunks": len(order), "loss_mask": masked,
        **({"trained_targets": sum(results[k]["trained_targets"] for k in order)} if masked else {}),
        "dtype": np.dtype(token_dtype(cfg.tokenizer)).name, "config": asdict(cfg), "inputs": files,
    }  # fmt: skip
    Path(f"{cfg.output}.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(parts)
    return summary
