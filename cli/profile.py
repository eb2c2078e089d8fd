"""``sp-profile``: calibrate the cost model on the ranks at hand (local gloo ranks on CPU).

sp-profile [--world 4] [--mbytes 16] [--out configs/cluster/cpu.yaml] [--model tiny]

With ``--model NAME`` (a file of configs/model/) it also measures the bytes that model saves for backward per
token (saved-tensor hooks on the trainer's own model) and writes ``act_bytes_per_token`` (measured saved +
the cost model's transient working set) into the profile.
"""

from __future__ import annotations

import argparse
import json

import yaml


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sp-profile", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--mbytes", type=float, default=16.0, help="message size for bandwidth (MiB)")
    ap.add_argument("--out", default=None, help="write the cluster profile YAML here (usable as cluster=NAME)")
    ap.add_argument("--memory-gib", type=float, default=4.0)
    ap.add_argument("--model", default=None, help="measure activation bytes per token of configs/model/NAME.yaml")
    ap.add_argument("--act-tokens", type=int, default=2048)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args(argv)
    from trainer.profile import activation_bytes_per_token, profile

    prof = profile(args.world, args.mbytes)
    if args.model:
        from pathlib import Path

        from planner.types import ModelShape

        spec = yaml.safe_load(
            (Path(__file__).resolve().parents[1] / "configs" / "model" / f"{args.model}.yaml").read_text()
        )
        spec.pop("defaults", None)
        prof["act_bytes_per_token"] = activation_bytes_per_token(ModelShape(**spec), args.act_tokens, args.precision)
    print(json.dumps(prof))
    if args.out:
        attn = prof.pop("attention_tflops")
        body = {"defaults": ["cluster_schema"], **prof, "memory_gib": args.memory_gib,
                "intra_gbs": min(prof["a2a_gbs"].values(), default=1.0),
                "inter_gbs": min(prof["a2a_gbs"].values(), default=1.0)}  # fmt: skip
        with open(args.out, "w") as f:
            f.write(f"# written by sp-profile (attention kernel measured at {attn:.4f} TFLOP/s)\n")
            yaml.safe_dump(body, f, sort_keys=False)


if __name__ == "__main__":
    main()
