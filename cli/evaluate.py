"""``sp-eval RUN_DIR``: the validation of ``sp-train`` on a checkpoint, offline (any launcher, like sp-train).

    torchrun --nproc_per_node 4 -m cli.evaluate runs/stage1                 # the run's held-out documents
    sp-eval runs/stage1 --step 200 --data-source jsonl --data-path long_eval.jsonl --max-docs 100
    sp-eval runs/stage1 --task needle --lengths 8192 32768 --depths 0 0.5 1 --samples 4 --json
    sp-eval runs/stage1 --task needle --tasks-out tasks.jsonl               # also writes the tasks scored
    sp-eval runs/stage1 --task needle --tasks-in tasks.jsonl --json         # scores a given task file

The job is the checkpoint's own (config.json); its weights are loaded into a fresh model (weights only), and
the evaluation is the trainer's (:mod:`trainer.evaluate`): forward only under the planner's plans, loss by
position and by length. Without ``--data-path`` it evaluates the run's held-out documents and ``eval.sources``
(the run needs ``eval.holdout > 0`` or eval sources); with it, the first ``--max-docs`` documents of that source. Writes
``RUN_DIR/eval/offline_step_N.json`` and a PNG next to it; prints the JSON.

``--task needle``: needle retrieval by length and depth (:mod:`trainer.tasks.needle`; the run's ``eval.needle``
settings unless overridden), teacher-forced under the planner's plans; the haystack from the run's held-out
documents. Writes ``RUN_DIR/eval/needle_offline_step_N.json`` (its heatmap PNG in ``RUN_DIR/eval/offline-step_N/
eval``, so the run's own reports of that step stay as they are); ``--json`` prints
``{"task", "lengths", "depths", "accuracy", "logprob", "samples", ...}`` (rows by length, columns by depth).
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
    if args.task == "needle":
        job = _needle_job(job, args)
    elif args.tasks_in or args.tasks_out or args.lengths or args.depths or args.samples:
        raise ValueError("--tasks-in, --tasks-out, --lengths, --depths and --samples go with --task needle")
    if args.data_path is None and not args.tasks_in and not (job.eval.holdout or job.eval.sources):
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
    if args.task == "needle":
        return _needle(tr, args, run_dir, ck, step, rank, changed)
    result = tr.evaluate(docs)
    if rank != 0:
        return None
    body = {"run_dir": str(run_dir), "checkpoint": str(ck), "step": step, "loss": result.loss,
            "tokens": result.tokens, "by_position": _buckets(result.by_position),
            "by_length": _buckets(result.by_length),
            "sets": {k: {"loss": v.loss, "tokens": v.tokens} for k, v in tr.last_eval_parts.items()},
            **({"data_changed": changed} if changed else {})}  # fmt: skip
    if changed:
        print(f"sp-eval: WARNING: the training data changed since {ck.name} (--data-changed-ok): "
              + "; ".join(changed), file=sys.stderr)  # fmt: skip
    (run_dir / "eval" / f"offline_step_{step:06d}.json").write_text(json.dumps(body, indent=1))
    return body


def _buckets(values: dict[str, tuple[float, int]]) -> dict[str, tuple[float | None, int]]:
    """Bucket -> (mean, tokens), null for a bucket with no token (strict JSON has no NaN)."""
    return {k: (None if n == 0 else v, n) for k, (v, n) in values.items()}


def _needle_job(job: Any, args: argparse.Namespace) -> Any:
    """The run's job with ``eval.needle`` overridden by ``--lengths``, ``--depths``, ``--samples``."""
    from dataclasses import replace

    n = job.eval.needle
    n = replace(n, lengths=tuple(args.lengths) if args.lengths else n.lengths,
                depths=tuple(args.depths) if args.depths else n.depths, samples=args.samples or n.samples)  # fmt: skip
    if not args.tasks_in and not (job.eval.holdout or job.eval.sources):
        raise ValueError("--task needle builds its haystack from the run's held-out documents, and this run has "
                         "none (eval.holdout=0): score a task file with --tasks-in")  # fmt: skip
    return replace(job, eval=replace(job.eval, needle=n))


def _needle(tr: Any, args: argparse.Namespace, run_dir: Path, ck: Path, step: int, rank: int,
            changed: list[str]) -> dict | None:  # fmt: skip
    from trainer.tasks.needle import read_tasks, write_tasks

    tasks = read_tasks(args.tasks_in) if args.tasks_in else tr.needle_tasks()
    grid = tr.evaluate_needle(tasks)  # its heatmap in the offline folder, beside the loss evaluation's picture
    if rank != 0:
        return None
    if args.tasks_out:
        write_tasks(tasks, args.tasks_out)
    body = {**grid.json(), "run_dir": str(run_dir), "checkpoint": str(ck), "step": step}
    body |= ({"tasks_in": args.tasks_in} if args.tasks_in else {}) | ({"data_changed": changed} if changed else {})
    (run_dir / "eval" / f"needle_offline_step_{step:06d}.json").write_text(json.dumps(body, indent=1))
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
    ap.add_argument(
        "--task",
        choices=["loss", "needle"],
        default="loss",
        help="loss: validation loss by position (default); needle: retrieval by length and depth",
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="needle: task lengths in tokens")
    ap.add_argument("--depths", type=float, nargs="+", default=None, help="needle: depths in [0, 1]")
    ap.add_argument("--samples", type=int, default=0, help="needle: tasks per (length, depth) cell")
    ap.add_argument("--tasks-out", default=None, help="needle: write the tasks scored, one JSON line each")
    ap.add_argument("--tasks-in", default=None, help="needle: score this task file instead of building tasks")
    ap.add_argument("--json", action="store_true", help="print only the result's JSON (the default prints it too)")
    args = ap.parse_args(argv)
    import contextlib

    try:  # with --json, stdout is the result alone: the trainer's log lines go to stderr
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            body = run(args)
    except ValueError as e:
        print(f"sp-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    if body is not None:
        print(json.dumps(body))


if __name__ == "__main__":
    main()
