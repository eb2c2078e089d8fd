"""``sp-data prepare``: tokenise text or JSONL into megatron-core's indexed format (parallel, resumable).

    sp-data prepare books/*.jsonl --output data/books --tokenizer /models/Llama-3.1-8B --workers 16
    sp-data prepare 'repos/**/*.py' --output data/code                 # each file one document, bytes
    sp-train data.sources='[{name: books, source: indexed, path: data/books, weight: 0.6}, ...]'

JSONL rows are ``{"text": ...}``, ``{"text": ..., "loss_mask": [0/1 per token]}`` or ``{"prompt": ...,
"completion": ...}`` (only the completion trains); the masks go to ``PREFIX_lossmask``. An interrupted run
continues where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sp-data", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise text/JSONL into PREFIX.bin/.idx (megatron-core indexed format)")
    p.add_argument("inputs", nargs="+", help="files or quoted glob patterns: *.jsonl[.gz] rows, others whole files")
    p.add_argument("--output", required=True, help="PREFIX of the written dataset (no .bin/.idx)")
    p.add_argument("--tokenizer", default=None, help="tokenizers JSON file or Hugging Face folder (default: bytes)")
    p.add_argument("--text-field", default="text", help="the JSONL text field (default: text)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--chunk-rows", type=int, default=2000, help="rows (or files) per work unit and resume point")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: interrupt after N chunks
    args = ap.parse_args(argv)
    from trainer.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=tuple(args.inputs), output=args.output, tokenizer=args.tokenizer,
                        text_field=args.text_field, workers=args.workers, chunk_rows=args.chunk_rows)  # fmt: skip
    try:
        summary = prepare(cfg, progress=not args.no_progress, stop_after=args.stop_after)
    except ValueError as e:
        print(f"sp-data: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "inputs")}))
    if summary["output"] is None:
        sys.exit(3)  # interrupted on purpose (--stop-after): run again to finish


if __name__ == "__main__":
    main()
