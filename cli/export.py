"""``sp-export RUN_DIR OUT_DIR``: one of our runs -> a Hugging Face folder that
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads (config.json with the run's rope
settings, ``model-0000k-of-0000n.safetensors`` + index, the run's tokenizer files). Streams tensor by
tensor: peak memory is one parameter plus one shard (``--max-shard-gb``), never the whole model.

    sp-export runs/stage2 hf/stage2                 # newest intact checkpoint, bf16
    sp-export runs/stage2 hf/stage2 --step 2500 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> dict:
    from models.hf.export import DTYPES, export
    from trainer import checkpoint

    run_dir = Path(args.run_dir)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r}; valid: {sorted(DTYPES)}")
    if args.step is not None:
        ck = run_dir / "checkpoints" / f"step_{args.step:06d}"
        if not ck.is_dir():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
            raise ValueError(f"--step {args.step}: {ck} does not exist; checkpoints in {run_dir}: {have or 'none'}")
        problem = checkpoint.verify(ck)
        if problem is not None:
            raise ValueError(f"--step {args.step}: {problem}")
    else:
        found, warnings = checkpoint.newest_intact(str(run_dir))
        for w in warnings:
            print(f"[sp-export] WARNING: {w}", file=sys.stderr)
        if found is None:
            raise ValueError(f"{run_dir}: no intact checkpoint in {run_dir / 'checkpoints'}")
        ck = found
    flat = checkpoint.stored_config(ck)
    return export(ck, flat, Path(args.out_dir), run_dir, args.dtype, int(args.max_shard_gb * 2**30))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sp-export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir", help="a run folder (train.out_dir) with checkpoints")
    ap.add_argument("out_dir", help="the Hugging Face folder to write")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    ap.add_argument("--dtype", default="bf16", help="bf16 | fp32 | fp16 (default bf16)")
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (default 2 GiB)")
    args = ap.parse_args(argv)
    try:
        print(json.dumps(run(args)))
    except ValueError as e:
        print(f"sp-export: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
