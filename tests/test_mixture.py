"""Data mixtures: deterministic and exactly resumable (in the loader and through a real checkpoint), token
shares by weight, epochs, the length schedule, per-source bounds, eval sources, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.dist import run_distributed
from trainer.config import DataConfig, EvalConfig, SourceConfig
from trainer.data.corpus import Corpus
from trainer.data.mixture import Mixture


def _source(path, n, lo, hi, seed, letter):
    """A JSONL source of ``n`` documents of ``lo..hi`` bytes, each document's bytes unique to it."""
    rng = np.random.default_rng(seed)
    rows = [{"text": f"{letter}{i:05d}:" + letter * int(rng.integers(lo, hi))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    return (
        SourceConfig(name="books", source="jsonl", path=_source(tmp / "b.jsonl", 12, 300, 900, 1, "b"), weight=0.5),
        SourceConfig(name="code", source="jsonl", path=_source(tmp / "c.jsonl", 40, 50, 400, 2, "c"), weight=0.3),
        SourceConfig(name="short", source="jsonl", path=_source(tmp / "s.jsonl", 9, 20, 60, 3, "s"), weight=0.2),
    )


def _mixture(sources, **kw):
    cfg = DataConfig(sources=sources, **{"max_len": 1024, "tokens_per_step": 600, "seed": 5} | kw)
    return Mixture([Corpus(s) for s in cfg.mixture()], cfg)


def _ids(docs):
    """Each piece as (document label, first byte offset): the label is the document's own prefix."""
    return [bytes(d[:7].astype(np.uint8)).decode() for d in docs]


def test_mixture_is_deterministic_and_resumes_exactly(three):
    full = _mixture(three)
    unbroken = [[d.tobytes() for d in full.next_step()] for _ in range(30)]
    first = _mixture(three)
    head = [[d.tobytes() for d in first.next_step()] for _ in range(11)]
    state = json.loads(json.dumps(first.state()))  # what a checkpoint keeps (plain JSON types)
    second = _mixture(three)
    second.load_state(state, 11)
    tail = [[d.tobytes() for d in second.next_step()] for _ in range(19)]
    assert head + tail == unbroken
    assert second.state() == full.state()
    other = _mixture(three, seed=6)
    assert [[d.tobytes() for d in other.next_step()] for _ in range(30)] != unbroken
    with pytest.raises(ValueError, match="data position is for step 11, not 12"):
        _mixture(three).load_state(state, 12)


def test_token_shares_follow_the_weights_and_epochs_never_repeat_a_document(three):
    mix = _mixture(three)
    seen: dict[str, list[str]] = {"b": [], "c": [], "s": []}
    events = []
    for _ in range(60):
        for label in _ids(mix.next_step()):
            if label[1:6].isdigit():  # a document's first piece (later pieces start mid-text)
                seen[label[0]].append(label)
        events += mix.take_events()
    tokens = np.array([s.tokens for s in mix.streams], dtype=float)
    longest = max(int(c.sizes.max()) for c in mix.corpora)
    assert np.all(np.abs(tokens - tokens.sum() * np.array([0.5, 0.3, 0.2])) <= longest)
    for letter, n in (("b", 12), ("c", 40), ("s", 9)):  # within each epoch, every document exactly once
        labels = seen[letter]
        for e in range(len(labels) // n):
            assert sorted(labels[e * n : (e + 1) * n]) == sorted(set(labels[:n])), letter
    short = mix.streams[2]
    assert short.epoch >= 2 and sum("source 'short' starts epoch" in e for e in events) == short.epoch
    assert Mixture.counters(mix.state())["data/short/epoch"] == short.epoch + 1


def test_length_schedule_and_source_bounds(three):
    books, code, short = three
    sources = (books, SourceConfig(**{**code.__dict__, "min_len": 200}), SourceConfig(**{**short.__dict__,
               "max_len": 16}))  # fmt: skip
    mix = _mixture(sources, max_len_schedule=((0, 128), (4, 512)))
    for step in range(10):
        docs = mix.next_step()
        limit = 128 if step < 4 else 512
        assert max(len(d) - 1 for d in docs) <= limit, step
        events = mix.take_events()
        assert any("data.max_len 128 -> 512 at step 4" in e for e in events) == (step == 4)
    assert mix.skipped["code"] == int((mix.corpora[1].sizes - 1 < 200).sum()) > 0
    assert mix.streams[2].split > 0  # short's own bound (16) is below the schedule's
    for s, c in zip(mix.streams, mix.corpora, strict=True):
        assert all(c.sizes[d] - 1 >= c.src.min_len for d in s.eligible)
    assert DataConfig(max_len=512, max_len_schedule=((0, 128), (4, 512))).max_len_at(3) == 128


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: Corpus(SourceConfig(name="books", source="jsonl", path=str(p / "none.jsonl"))),
         r"source 'books' \(source='jsonl', path='.*none.jsonl'\): JSONL file not found"),
        (lambda p: DataConfig(sources=(SourceConfig(name="a", weight=0), SourceConfig(name="b", weight=0))),
         r"weights \[0, 0\] sum to 0; valid: weights >= 0 summing to > 0"),
        (lambda p: SourceConfig(name="a", weight=-1), r"source 'a': weight=-1; valid: a finite number >= 0"),
        (lambda p: DataConfig(sources=(SourceConfig(name="a"), SourceConfig(name="a"))), r"names \['a', 'a'\] repeat"),
        (lambda p: SourceConfig(name="a b"), r"source name 'a b'; valid"),
        (lambda p: SourceConfig(name="a", source="jsonl"), r"source 'a' \(source='jsonl'\) needs a path"),
        (lambda p: DataConfig(path="x.jsonl", source="jsonl", sources=(SourceConfig(name="a"),)),
         r"give each source its own source and path"),
        (lambda p: DataConfig(max_len_schedule=((5, 100),)), r"the first at step 0"),
        (lambda p: DataConfig(max_len=1000, max_len_schedule=((0, 100), (5, 2000))), r"lengths \[2000\] are outside"),
        (lambda p: EvalConfig(every=5), r"set eval.holdout \(e.g. 0.01\) or eval.sources"),
    ],
)  # fmt: skip
def test_bad_mixtures_are_clear_errors(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path)


def test_hydra_overrides_build_the_mixture():
    from omegaconf import OmegaConf

    from cli.schema import DataSchema, freeze

    node = OmegaConf.merge(OmegaConf.structured(DataSchema), OmegaConf.from_dotlist([
        "sources=[{name: code, source: stdlib, weight: 0.8}, {name: docs, source: pydoc, weight: 0.2, max_len: 512}]",
        "max_len_schedule=[[0,1024],[30,4096]]"]))  # fmt: skip
    cfg = freeze(DataConfig, OmegaConf.to_object(node))
    assert cfg.sources[1] == SourceConfig(name="docs", source="pydoc", weight=0.2, max_len=512)
    assert cfg.max_len_schedule == ((0, 1024), (30, 4096)) and cfg.max_len_at(30) == 4096
    with pytest.raises(Exception, match="wieght"):
        OmegaConf.merge(OmegaConf.structured(DataSchema), OmegaConf.from_dotlist(["sources=[{name: a, wieght: 1}]"]))


def _job(out, sources, steps, resume, eval_sources=()):
    from dataclasses import replace

    from tests.test_trainer import _job as base

    job = base(out, "adaptive", steps, use_milp=False, checkpoint_every=2, resume=resume)
    return replace(job, data=DataConfig(sources=sources, max_len=768, tokens_per_step=1500, seed=2,
                                        max_len_schedule=((0, 256), (3, 768))),
                   eval=EvalConfig(every=2, holdout=0.1, max_docs=3, sources=eval_sources))  # fmt: skip


def _trainer_worker(rank, world, tmp, sources, eval_src):
    """4 steps unbroken; 2 steps, then a new trainer resumes to 4: the documents of every step, the checkpoint's
    per-source counters, and the evaluation's sets."""
    import torch

    from trainer.loop import Trainer

    def run(out, steps, resume):
        tr = Trainer(_job(out, sources, steps, resume, (eval_src,)))
        drawn = []
        draw = tr.loader.next_step
        tr.loader.next_step = lambda: drawn.append([d.tobytes() for d in draw()]) or [np.frombuffer(b, np.int64)
                                                                                       for b in drawn[-1]]  # fmt: skip
        tr.run()
        return tr, drawn

    full, drawn_full = run(f"{tmp}/full", 4, False)
    run(f"{tmp}/broken", 2, False)
    resumed, drawn_tail = run(f"{tmp}/broken", 4, True)
    extra = torch.load(f"{tmp}/full/checkpoints/step_000004/extra.pt", weights_only=True)
    return {"full": drawn_full, "tail": drawn_tail, "loader": extra["loader"],
            "sets": sorted(full.last_eval_parts), "heldout": [h.tolist() for h in full.heldout],
            "eligible": [s.eligible.tolist() for s in full.loader.streams]}  # fmt: skip


def test_a_three_source_run_resumes_from_its_checkpoint_with_the_same_documents(three, tmp_path):
    held = SourceConfig(name="held", source="jsonl", path=three[2].path)
    r = run_distributed(_trainer_worker, 2, str(tmp_path), three, held, timeout=300)[0]
    # the unbroken run draws steps 0..3 (the 4th draw is never taken); the resumed one draws from step 2
    assert r["tail"][: len(r["full"]) - 2] == r["full"][2:]
    counters = r["loader"]["sources"]
    assert sorted(counters) == ["books", "code", "short"] and r["loader"]["step"] == 4
    assert all(c["tokens"] > 0 and c["documents"] > 0 for c in counters.values())
    assert r["sets"] == ["books", "code", "held", "short"]  # held-out of each source, plus the eval source
    for held, eligible in zip(r["heldout"], r["eligible"], strict=True):
        assert held and not set(held) & set(eligible)


def test_a_resume_refusal_names_the_changed_source_fields():
    from trainer.run_dir import config_changes

    old = {"data.sources": [{"name": "code", "weight": 0.6, "min_len": 0}, {"name": "sft", "weight": 0.4}]}
    new = {"data.sources": [{"name": "code", "weight": 0.5, "min_len": 4096}, {"name": "books", "weight": 0.5}]}
    assert config_changes(old, new)[1] == [
        "data.sources[books]: added", "data.sources[code].min_len: 0 -> 4096",
        "data.sources[code].weight: 0.6 -> 0.5", "data.sources[sft]: removed",
    ]  # fmt: skip


def test_settings_added_since_a_checkpoint_count_as_their_defaults(tmp_path):
    """A run stored before data.sources existed resumes under the new version when nothing else changed."""
    from tests.test_trainer import _job
    from trainer.run_dir import flat_config, resume_check

    config = flat_config(_job(str(tmp_path)))
    old = {k: v for k, v in config.items() if k not in ("data.sources", "data.max_len_schedule", "eval.sources")}
    assert resume_check(tmp_path, "step_000002", old, config, None, {})[0].startswith("WARNING")  # no fingerprint
    with pytest.raises(ValueError, match=r"data.max_len_schedule: \[\] -> \[\[0, 256\]\]"):
        resume_check(tmp_path, "step_000002", old, {**config, "data.max_len_schedule": [[0, 256]]}, None, {})


def test_a_large_jsonl_source_suggests_preparing_it(three, monkeypatch, capsys):
    import trainer.data.corpus as corpus

    monkeypatch.setattr(corpus, "LARGE_JSONL", 100)
    monkeypatch.setenv("RANK", "0")
    Corpus(three[0])
    assert "`sp-data prepare` it once and train on source=indexed" in capsys.readouterr().err
