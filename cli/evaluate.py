"""``sp-eval RUN_DIR``: the validation of ``sp-train`` on a checkpoint, offline (any launcher, like sp-train).

    torchrun --nproc_per_node 4 -m cli.evaluate runs/stage1                 # the run's held-out documents
    sp-eval runs/stage1 --step 200 --data-source jsonl --data-path long_eval.jsonl --max-docs 100

The job is the checkpoint's own (config.json); its weights are loaded into a fresh model (weights only), and
the evaluation is the trainer's (:mod:`trainer.evaluate`): forward only under the planner's plans, loss by
position and by length. Without ``--data-path`` it evaluates the run's held-out documents and ``eval.sources``
(the run needs ``eval.holdout > 0`` or eval sources); with it, the first ``--max-docs`` documents of that source. Writes
``RUN_DIR/eval/offline_step_N.json`` and a PNG next to it; prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> dict | None:
    from dataclasses import replace

    import numpy as np
    import torch.distributed as dist

    from trainer import checkpoint
    from trainer.bootstrap import init_distributed
    from trainer.run_dir import job_from_flat

    run_dir = Path(args.run_dir)
    if args.step is not None:
        ck = run_dir / "checkpoints" / f"step_{args.step:06d}"
        problem = checkpoint.verify(ck) if ck.is_dir() else f"{ck} does not exist"
        if problem is not None:
            raise ValueError(f"--step {args.step}: {problem}")
    else:
        found, _ = checkpoint.newest_intact(str(run_dir))
        if found is None:
            raise ValueError(f"{run_dir}: no intact checkpoint in {run_dir / 'checkpoints'}")
        ck = found
    job = job_from_flat(checkpoint.stored_config(ck))
    if args.data_path is None and not (job.eval.holdout or job.eval.sources):
        raise ValueError(f"{run_dir} was trained without held-out documents (eval.holdout=0): name the documents "
                         "to evaluate with --data-path (and --data-source)")  # fmt: skip
    step = int(ck.name.removeprefix("step_"))
    out = run_dir / "eval" / f"offline-step_{step:06d}"
    train = replace(job.train, init_from=str(ck), resume=False, out_dir=str(out), progress=False)
    job = replace(job, eval=replace(job.eval, max_docs=args.max_docs or job.eval.max_docs), train=train)
    docs = None
    if args.data_path is not None:  # checked before any process group or model exists
        from trainer.config import SourceConfig
        from trainer.data.corpus import Corpus, doc_pieces

        corpus = Corpus(SourceConfig(name="documents", source=args.data_source, path=args.data_path),
                        job.data.tokenizer)  # fmt: skip
        docs = doc_pieces(corpus, np.arange(min(job.eval.max_docs, len(corpus))), job.data.max_len_at(step - 1),
                          job.data.long_docs)  # fmt: skip
    env = init_distributed(job.train.collective_timeout_s)
    from trainer.loop import Trainer

    tr = Trainer(job)
    try:
        body = _evaluate(tr, args, run_dir, ck, step, docs, env.rank)
    finally:
        if tr.board is not None:
            tr.board.close()
        if tr.lock is not None:
            tr.lock.release()
        dist.destroy_process_group()
    return body


def _evaluate(tr: Any, args: argparse.Namespace, run_dir: Path, ck: Path, step: int, docs: list | None,
              rank: int) -> dict | None:  # fmt: skip
    from trainer import checkpoint
    from trainer.data.fingerprint import fingerprint_changes

    stored = checkpoint.stored_data(ck)
    changed = fingerprint_changes(stored, tr.data_fingerprint) if docs is None and stored is not None else []
    if changed and not args.data_changed_ok:
        raise ValueError(f"{run_dir}: the training data changed since {ck.name}, so its held-out documents may "
                         "not be the ones the run held out (they may have been trained on). Differences:\n  "
                         + "\n  ".join(changed) + "\nRestore the data, or pass --data-changed-ok to evaluate "
                         "anyway (the result then lists the differences under data_changed)")  # fmt: skip
    tr.step = step
    result = tr.evaluate(docs)
    if rank != 0:
        return None
    body = {"run_dir": str(run_dir), "checkpoint": str(ck), "step": step, "loss": result.loss,
            "tokens": result.tokens, "by_position": result.by_position, "by_length": result.by_length,
            "sets": {k: {"loss": v.loss, "tokens": v.tokens} for k, v in tr.last_eval_parts.items()},
            **({"data_changed": changed} if changed else {})}  # fmt: skip
    if changed:
        print(f"sp-eval: WARNING: the training data changed since {ck.name} (--data-changed-ok): "
              + "; ".join(changed), file=sys.stderr)  # fmt: skip
    (run_dir / "eval" / f"offline_step_{step:06d}.json").write_text(json.dumps(body, indent=1))
    return body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sp-eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir", help="a run folder (train.out_dir) with checkpoints")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    ap.add_argument("--data-path", default=None, help="evaluate these documents instead of the held-out ones")
    ap.add_argument("--data-source", default="jsonl", help="stdlib | pydoc | glob | jsonl | indexed (with --data-path)")
    ap.add_argument("--max-docs", type=int, default=0, help="documents to evaluate (default: the run's eval.max_docs)")
    ap.add_argument("--data-changed-ok", action="store_true",
                    help="evaluate the held-out documents even if the training data changed since the checkpoint "
                         "(refused by default: they may not be the documents the run held out)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        body = run(args)
    except ValueError as e:
        print(f"sp-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    if body is not None:
        print(json.dumps(body))


if __name__ == "__main__":
    main()
