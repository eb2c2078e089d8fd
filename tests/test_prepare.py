"""``sp-data prepare``: read back equals direct tokenisation (bytes and a BPE tokenizer, loss masks
included), an interrupted preparation resumes to the same bytes, and bad input is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.config import SourceConfig
from trainer.data.corpus import Corpus
from trainer.data.prepare import PrepareConfig, prepare


def _rows(rng, n):
    words = ["alpha", "beta", "gamma", "delta", "long context", "résumé", "λ", "\n"]
    text = lambda k: " ".join(words[int(i)] for i in rng.integers(0, len(words), k))  # noqa: E731
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"text": text(int(rng.integers(2, 60)))})
        elif i % 3 == 1:
            rows.append({"prompt": text(int(rng.integers(1, 20))), "completion": text(int(rng.integers(1, 30)))})
        else:
            rows.append({"text": "mask me " + text(int(rng.integers(1, 20)))})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    rng = np.random.default_rng(0)
    for name, n in (("a.jsonl", 17), ("b.jsonl", 11)):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" + "\n" * (i == 4) for i, r in enumerate(_rows(rng, n))))
    return tmp


def _with_masks(path, encode):
    """Rows of kind 3 get an explicit loss_mask (every other token), which needs the tokenizer's length."""
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    for r in rows:
        if r.get("text", "").startswith("mask me"):
            r["loss_mask"] = [int(i % 2 == 1) for i in range(len(encode(r["text"])))]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _bpe(tmp):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["alpha beta gamma delta long context résumé λ mask me"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))  # fmt: skip
    tok.save(str(tmp / "tokenizer.json"))
    return str(tmp / "tokenizer.json")


def _same(corpus_a, corpus_b):
    keep = [i for i in range(len(corpus_a)) if corpus_a.sizes[i] >= 2]
    assert len(keep) == len(corpus_b)
    for j, i in enumerate(keep):
        a, b = corpus_a.doc(i), corpus_b.doc(j)
        assert a.tolist() == b.tolist()
        ma, mb = getattr(a, "token_mask", None), getattr(b, "token_mask", None)
        assert (np.ones(len(a), bool) if ma is None else ma).tolist() == mb.tolist()


@pytest.mark.parametrize("tokenizer", [pytest.param("bytes", marks=pytest.mark.slow), "bpe"])
def test_read_back_equals_direct_tokenisation(inputs, tmp_path, tokenizer):
    from trainer.data.corpus import encoder

    tok = None if tokenizer == "bytes" else _bpe(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        src = tmp_path / name
        src.write_text((inputs / name).read_text())
        _with_masks(src, encoder(tok))
    (tmp_path / "notes.txt").write_text("a plain text file is one document\n")
    out = prepare(PrepareConfig(inputs=(str(tmp_path / "*.jsonl"), str(tmp_path / "notes.txt")),
                                output=str(tmp_path / "ds"), tokenizer=tok, workers=2, chunk_rows=4),
                  progress=False)  # fmt: skip
    ds = Corpus(SourceConfig(name="ds", source="indexed", path=str(tmp_path / "ds")), tok)
    direct = [Corpus(SourceConfig(name=n[0], source="jsonl", path=str(tmp_path / n)), tok) for n in ("a.jsonl",
              "b.jsonl")]  # fmt: skip
    n_a = sum(int(s >= 2) for s in direct[0].sizes)
    _same(direct[0], _Slice(ds, 0, n_a))
    _same(direct[1], _Slice(ds, n_a, n_a + sum(int(s >= 2) for s in direct[1].sizes)))
    last = ds.doc(len(ds) - 1)
    assert bytes(last.astype(np.uint8)) == b"a plain text file is one document\n" or tok is not None
    assert out["documents"] == len(ds) and out["tokens"] == int(ds.sizes.sum()) and out["loss_mask"]
    assert out["trained_targets"] == ds.trained == direct[0].trained + direct[1].trained + len(last) - 1
    (tmp_path / "ds.json").unlink()  # a mask channel without sp-data's summary: counted from its bytes
    assert Corpus(SourceConfig(name="ds", source="indexed", path=str(tmp_path / "ds")), tok).trained == ds.trained
    assert not (tmp_path / "ds.parts").exists()


class _Slice:
    def __init__(self, corpus, a, b):
        self.corpus, self.a, self.sizes = corpus, a, corpus.sizes[a:b]

    def __len__(self):
        return len(self.sizes)

    def doc(self, i):
        return self.corpus.doc(self.a + i)


@pytest.mark.slow  # a preparation killed and resumed in subprocesses
def test_an_interrupted_preparation_resumes_to_the_same_bytes(inputs, tmp_path):
    cfg = lambda out: PrepareConfig(inputs=(str(inputs / "*.jsonl"),), output=str(tmp_path / out), workers=2,
                                    chunk_rows=3)  # noqa: E731  # fmt: skip
    clean = prepare(cfg("clean"), progress=False)
    cli = [sys.executable, "-m", "cli.data", "prepare", str(inputs / "*.jsonl"), "--output", str(tmp_path / "cut"),
           "--workers", "2", "--chunk-rows", "3", "--no-progress"]  # fmt: skip
    first = subprocess.run([*cli, "--stop-after", "3"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 3, first.stderr[-2000:]
    assert len(list((tmp_path / "cut.parts").glob("*.done"))) >= 3
    second = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    body = json.loads(second.stdout.strip().splitlines()[-1])
    assert body["chunks_reused"] >= 3 and body["chunks_reused"] + body["chunks_written"] == clean["chunks"] == 10
    for suffix in (".bin", ".idx", "_lossmask.bin", "_lossmask.idx"):
        assert (tmp_path / f"clean{suffix}").read_bytes() == (tmp_path / f"cut{suffix}").read_bytes(), suffix


def test_bad_input_is_a_clear_error(inputs, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"prompt": "only a prompt"}\n')
    run = lambda *a: subprocess.run([sys.executable, "-m", "cli.data", "prepare", *a, "--output",  # noqa: E731
                                     str(tmp_path / "o"), "--no-progress", "--workers", "1"],
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
    bad = run(str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 2 and "bad.jsonl:2: field 'completion' is missing" in bad.stderr, bad.stderr[-2000:]
    missing = run(str(tmp_path / "none.jsonl"))
    assert missing.returncode == 2 and "input " in missing.stderr and "none.jsonl" in missing.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "changed"}\n')  # other inputs, same parts
    changed = run(str(tmp_path / "bad.jsonl"))
    assert changed.returncode == 2 and "holds a preparation of other inputs" in changed.stderr
