"""The data fingerprint's content hash: edited bytes of unchanged length change it, an unchanged file is not
read again, a damaged cache costs only a re-hash, and every file a source reads is covered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.config import SourceConfig


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SP_CACHE_DIR", str(tmp_path / "cache"))
    from trainer.data import content_hash

    return content_hash


def _jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return str(path)


def test_same_lengths_other_bytes_change_the_fingerprint(tmp_path, cache):
    import xxhash

    from trainer.data.corpus import Corpus
    from trainer.data.fingerprint import fingerprint, fingerprint_changes

    path = _jsonl(tmp_path / "d.jsonl", ["a banana", "an apple a day", "abc" * 40])
    src = SourceConfig(name="d", source="jsonl", path=path)
    before = fingerprint([Corpus(src)])
    raw = (tmp_path / "d.jsonl").read_bytes()
    (tmp_path / "d.jsonl").write_bytes(raw.replace(b"a", b"b"))  # sed -i 's/a/b/g': every length unchanged
    after = fingerprint([Corpus(src)])
    diffs = fingerprint_changes(before, after)
    assert len(diffs) == 1 and "content_xxh3_128" in diffs[0], diffs
    # independent reference: the file's own xxh3-128 (streamed in blocks or not, the same digest)
    assert cache.file_digest(path) == xxhash.xxh3_128(raw.replace(b"a", b"b")).hexdigest()
    old = {"sources": [{k: v for k, v in before["sources"][0].items() if k != "content_xxh3_128"}]}
    assert fingerprint_changes(old, after) == []  # a checkpoint from before content hashes: not a difference


def test_an_unchanged_file_is_read_from_the_cache_and_a_damaged_cache_rehashes(tmp_path, cache, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(bytes(range(256)) * 100)
    first = cache.content_hash([str(f)])
    calls = []
    real = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda p: calls.append(p) or real(p))
    assert cache.content_hash([str(f)]) == first and calls == []  # cached by size and times
    cache.cache_file().write_text("{not json")
    assert cache.content_hash([str(f)]) == first and len(calls) == 1
    f.write_bytes(bytes(range(255, -1, -1)) * 100)  # same size, new bytes and times
    assert cache.content_hash([str(f)]) != first and len(calls) == 2
    monkeypatch.setenv("SP_CACHE_DIR", str(f))  # a cache folder that cannot exist: hashing still works
    assert cache.content_hash([str(f)]) == cache.content_hash([str(f)])


def test_every_file_a_source_reads_is_covered(tmp_path, cache):
    from trainer.data.corpus import Corpus
    from trainer.data.prepare import PrepareConfig, prepare

    rows = [{"prompt": "q" * (5 + i), "completion": "a" * (9 + i)} for i in range(6)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = str(tmp_path / "sft")
    prepare(PrepareConfig(inputs=(str(tmp_path / "sft.jsonl"),), output=prefix, workers=1), progress=False)
    indexed = Corpus(SourceConfig(name="i", source="indexed", path=prefix))
    assert indexed.files() == [prefix + ext for ext in (".idx", ".bin", "_lossmask.idx", "_lossmask.bin")]
    (tmp_path / "g").mkdir()
    for i in range(3):
        (tmp_path / "g" / f"{i}.txt").write_bytes(np.full(40 + i, 65, dtype=np.uint8).tobytes())
    globbed = Corpus(SourceConfig(name="g", source="glob", path=str(tmp_path / "g" / "*.txt")))
    assert globbed.files() == [str(tmp_path / "g" / f"{i}.txt") for i in range(3)]
    assert Corpus(SourceConfig(name="s", source="stdlib")).files() == []


def test_a_damaged_indexed_dataset_is_refused_before_it_is_used(tmp_path, cache):
    """A .bin shorter than its index describes, or an unreadable .idx, is a ValueError naming the files."""
    from trainer.data.corpus import Corpus
    from trainer.data.prepare import PrepareConfig, prepare

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": "abc" * (5 + i)}) + "\n" for i in range(20)))
    prefix = str(tmp_path / "t")
    prepare(PrepareConfig(inputs=(str(tmp_path / "t.jsonl"),), output=prefix, workers=1), progress=False)
    src = SourceConfig(name="t", source="indexed", path=prefix)
    assert len(Corpus(src)) == 20
    raw = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=f"{prefix}.bin holds {len(raw) - 10} bytes but {prefix}.idx describes "
                       f"{len(raw)}"):  # fmt: skip
        Corpus(src)
    (tmp_path / "t.bin").write_bytes(raw)
    idx = (tmp_path / "t.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(idx[:20])
    with pytest.raises(ValueError, match=f"{prefix}.idx is damaged"):
        Corpus(src)
