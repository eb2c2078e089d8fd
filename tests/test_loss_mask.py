"""Issue 19 (loss masks): prompt + completion rows and explicit per-token masks train only on their marked
targets; the step's loss is normalised by the trained targets. Gradients of a masked step on 2 ranks (adaptive
planner, FSDP2) equal an independent single-process computation that drops the masked targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist import run_distributed
from trainer.config import DataConfig, SourceConfig
from trainer.data.corpus import Corpus, target_weights, trained_targets
from trainer.data.mixture import Mixture


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n=24, seed=0):
    rng = np.random.default_rng(seed)
    word = lambda k: "".join(chr(c) for c in rng.integers(97, 123, k))  # noqa: E731
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"text": word(int(rng.integers(40, 300)))})
        elif i % 3 == 1:
            rows.append({"prompt": word(int(rng.integers(20, 200))), "completion": word(int(rng.integers(5, 120)))})
        else:
            t = word(int(rng.integers(30, 250)))
            rows.append({"text": t, "loss_mask": [int(x) for x in rng.integers(0, 2, len(t))]})
    return rows


def test_prompt_and_explicit_masks_mark_the_trained_targets(tmp_path):
    rows = [{"prompt": "Q: 2+2?", "completion": " A: 4"}, {"text": "abcdef", "loss_mask": [0, 1, 1, 0, 0, 1]},
            {"text": "plain"}]  # fmt: skip
    corpus = Corpus(SourceConfig(name="a", source="jsonl", path=_jsonl(tmp_path / "a.jsonl", rows)))
    d0, d1, d2 = (corpus.doc(i) for i in range(3))
    assert bytes(d0.astype(np.uint8)) == b"Q: 2+2? A: 4"
    assert d0.token_mask.tolist() == [False] * 7 + [True] * 5  # targets are the completion's bytes
    assert target_weights(d0).tolist() == [0.0] * 6 + [1.0] * 5
    assert target_weights(d1).tolist() == [1, 1, 0, 0, 1] and target_weights(d2).tolist() == [1] * 4
    assert trained_targets([d0, d1, d2]) == 5 + 3 + 4 and corpus.trained == 12


def test_split_pieces_cut_tokens_and_mask_together(tmp_path):
    rows = [{"prompt": "p" * 50, "completion": "c" * 70}]
    cfg = DataConfig(source="jsonl", path=_jsonl(tmp_path / "a.jsonl", rows), max_len=30, tokens_per_step=119)
    mixture = Mixture([Corpus(s) for s in cfg.mixture()], cfg)
    docs = mixture.next_step()  # pieces of 30, 30, 30, 29 targets; the first is all prompt and is dropped
    assert [len(d) - 1 for d in docs] == [30, 30, 29] and mixture.untrained == {"jsonl": [50]}
    for d in docs:  # every piece's mask matches its own bytes: 'c' is trained, 'p' is not
        assert d.token_mask.tolist() == [b == ord("c") for b in d.tolist()]
    assert trained_targets(docs) == 70


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "only a prompt"}, r"a.jsonl:2: field 'completion' is missing"),
        ({"prompt": "p", "completion": ""}, r"a.jsonl:2: field 'completion' is empty \(a prompt-only row"),
        (
            {"text": "abc", "loss_mask": [1, 1, 1, 1]},
            r"a.jsonl:2: field 'loss_mask' has 4 entries for a document "
            r"of 3 tokens",
        ),  # fmt: skip
        ({"text": "abc", "loss_mask": [1, 2, 0]}, r"a.jsonl:2: field 'loss_mask' must be a list of 0/1"),
        ({"text": "abc", "loss_mask": [1, 0, 0]}, r"a.jsonl:2: field 'loss_mask' marks no target"),
        ({"body": "abc"}, r"a.jsonl:2 has no field 'text' \(keys \['body'\]; or 'prompt' \+ 'completion'\)"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, message):
    path = _jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, row])
    with pytest.raises(ValueError, match=message):
        Corpus(SourceConfig(name="a", source="jsonl", path=path))


def _masked_step(rank, world, path, tmp):
    """One planned step of the real trainer on masked data; every rank returns the full gradients."""
    from dataclasses import replace

    from models.attention import SPPackedSeqParams
    from models.gpt import build_gpt
    from tests.test_trainer import _job
    from trainer.loop import Trainer
    from trainer.step import run_plan

    job = _job(f"{tmp}/masked", "adaptive", use_milp=False)
    job = replace(job, data=replace(job.data, source="jsonl", path=path, max_len=256, tokens_per_step=1500),
                  cluster=replace(job.cluster, gpus_per_node=world))  # fmt: skip
    tr = Trainer(job)
    docs = tr.loader.next_step()
    plan = tr.planner.plan([len(d) - 1 for d in docs])
    stats = run_plan(tr.model, tr.pool, plan, docs, rank, None)
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor() for n, p in tr.model.named_parameters()}
    loss = stats.loss_sum.clone()
    torch.distributed.all_reduce(loss)
    if rank:
        return None
    # the reference: one process, one document at a time, only the unmasked targets enter the loss
    ref = build_gpt(tr.job.model, tr.job.data.max_len, seed=tr.job.train.seed)
    keep = [torch.from_numpy(target_weights(d)).bool() for d in docs]
    n = sum(int(k.sum()) for k in keep)
    total = 0.0
    for d, k in zip(docs, keep, strict=True):
        ctx = tr.pool.context((0,), 1, 1, [0, len(d) - 1], check=False)
        per_token = ref(torch.from_numpy(np.asarray(d[:-1]))[None], None, None,
                        labels=torch.from_numpy(np.asarray(d[1:]))[None],
                        packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx))[0]  # fmt: skip
        kept = per_token[k].sum()  # the masked targets are dropped, not weighted
        (kept / n).backward()
        total += kept.item()
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    masked_docs = sum(getattr(d, "token_mask", None) is not None for d in docs)
    return grads, ref_grads, loss.item() / n, total / n, masked_docs, len(plan.micro_steps[0].groups)


def test_masked_gradients_equal_a_single_process_computation_that_drops_masked_targets(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", _rows())
    out = run_distributed(_masked_step, 2, path, str(tmp_path), timeout=300)[0]
    grads, ref, loss, ref_loss, masked_docs, _ = out
    assert masked_docs >= 3
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    scale = max(g.abs().max().item() for g in ref.values())
    for name, g in grads.items():
        assert (g - ref[name]).abs().max().item() <= 1e-5 * scale, name


def _skipping_run(rank, world, path, tmp, share):
    """The trainer on prompts longer than max_len: (losses, tokens trained, skipped steps) or the error."""
    from dataclasses import replace

    from tests.test_trainer import _job
    from trainer.loop import Trainer

    job = _job(f"{tmp}/skip{share}", "adaptive", use_milp=False)
    job = replace(job, data=replace(job.data, source="jsonl", path=path, max_len=128, tokens_per_step=300),
                  train=replace(job.train, steps=6, max_skipped_share=share, checkpoint_every=0),
                  eval=replace(job.eval, every=0))  # fmt: skip
    try:
        tr = Trainer(job)
        losses = tr.run()
    except ValueError as e:
        return str(e)
    return losses, tr.tokens_trained, tr.skipped_steps


def test_a_step_with_nothing_to_learn_is_skipped_and_too_many_stop_the_run(tmp_path):
    """Prompts of 400 tokens at max_len=128: their first pieces are all prompt. The trainer skips exactly the
    steps a separate draw of the same mixture finds empty, counts only the kept pieces' tokens, and stops with
    the source and prompt lengths once skipped steps exceed train.max_skipped_share."""
    rows = [{"prompt": "p" * 400, "completion": "c" * 12}] * 8  # alike: the draw order cannot matter
    path = _jsonl(tmp_path / "long_prompts.jsonl", rows)
    cfg = DataConfig(source="jsonl", path=path, max_len=128, tokens_per_step=300)
    mixture = Mixture([Corpus(s) for s in cfg.mixture()], cfg)
    steps = [mixture.next_step() for _ in range(6)]
    empty = sum(not docs for docs in steps)
    assert 0 < empty < 6  # the data makes both kinds of step
    losses, tokens, skipped = run_distributed(_skipping_run, 1, path, str(tmp_path), 0.5, timeout=300)[0]
    assert skipped == empty and len(losses) == 6 - empty and all(np.isfinite(losses))
    assert tokens == sum(len(d) - 1 for docs in steps for d in docs)  # dropped pieces are not counted
    error = run_distributed(_skipping_run, 1, path, str(tmp_path), 0.0, timeout=300)[0]
    assert isinstance(error, str) and "train.max_skipped_share=0.0" in error, error
    assert "source 'jsonl': prompts of [400] tokens" in error and "data.max_len=128" in error
