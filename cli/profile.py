"""``sp-profile``: calibrate the cost model on the ranks at hand (local gloo ranks on CPU).

sp-profile [--world 4] [--mbytes 16] [--out configs/cluster/cpu.yaml]
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
    args = ap.parse_args(argv)
    from trainer.profile import profile

    prof = profile(args.world, args.mbytes)
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
