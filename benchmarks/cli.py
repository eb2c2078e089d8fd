"""``sp-bench``: benchmarks that print one JSON object per line.

sp-bench attention [--world 4] [--tokens 16384 65536]
sp-bench attention --vs-single [--tokens1 2048 4096 8192 16384] [--tokens4 8192 16384] [--reps 5]
sp-bench e2e [--steps 6] [--tokens 32768] [--max-len 32768] [--recalibrate 10 --no-static]
sp-bench planner [--lengths WIKI.txt.gz data/lengths/code_files.txt.gz] [--steps 20]
sp-bench memory [--world 1 2 4 8] [--tokens 4096 16384 32768] [--checkpointing full none] [--techniques plain all]
sp-bench longctx [--tokens 131072] [--world 8]
sp-bench cpu-kernel [--head-dims 32 64 128] [--keys 512 4096]
sp-bench flash-geometry [--tokens 131072] [--ring 1 4]   # host side of the flash ring step, on the CPU
sp-bench hf-load [--gb 1.0] [--world 4]       # peak host memory per rank loading a Hugging Face checkpoint
sp-bench capacity [--gpus 8 16 32 64]          # longest sequence per technique (llama3-8b on H100s)
sp-bench cpu-adam [--threads 1 2]              # AdamW on the host (optimizer-state offload), G params/s
sp-bench checkpoint [--gb 2.0] [--world 4]    # integrity share of save and resume: rank-0 sha256 vs parallel xxh3
sp-bench data [--tree before=PATH] [--steps 30]  # make train's steps/s: other code trees vs this one
sp-bench content-hash [--gb 1.0]               # start-up cost of hashing a data source's bytes (first, cached)
sp-bench published                              # sp-plan beside the published 1M-token Qwen3-8B run
sp-bench needle-learning [--steps 300] [--lengths 192 256] [--png FILE]  # the needle score of a model learning it
sp-bench gpu [--tokens 16384] [--out DIR]       # one CUDA GPU: every kernel vs fp64 and its TFLOP/s, training
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sp-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attention", help="SP attention fwd+bwd per strategy on gloo ranks")
    a.add_argument("--world", type=int, default=4)
    a.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    a.add_argument("--scaling", action="store_true", help="also run P=1,2 at the smallest size (memory ~1/P)")
    a.add_argument("--vs-single", action="store_true", help="runtime overhead: sp.attention vs one fused call")
    a.add_argument("--tokens1", type=int, nargs="*", default=[2048, 4096, 8192, 16384],
                   help="--vs-single, world 1 (none: skip)")  # fmt: skip
    a.add_argument("--tokens4", type=int, nargs="*", default=[8192, 16384], help="--vs-single, world 4 (none: skip)")
    a.add_argument("--reps", type=int, default=5, help="--vs-single: timed repeats after a warm-up")
    e = sub.add_parser("e2e", help="real CPU training, adaptive vs static layouts, interleaved")
    e.add_argument("--lengths", default=os.environ.get("SP_LENGTHS", "../shared/data/lengths/wikipedia.txt.gz"))
    e.add_argument("--steps", type=int, default=6)
    e.add_argument("--tokens", type=int, default=32768)
    e.add_argument("--max-len", type=int, default=32768)
    e.add_argument("--scale", type=float, default=4.0, help="multiply the file's lengths (longer tail)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--recalibrate", type=int, default=0, metavar="N",
                   help="add adaptive planners that re-fit the cost model every N steps (planner.fit), each beside "
                        "its fixed twin: the offline calibration and configs/cluster/cpu.yaml")  # fmt: skip
    e.add_argument("--no-static", action="store_true", help="skip the static layouts")
    p = sub.add_parser("planner", help="planner vs baselines on real lengths, and solve time at scale")
    p.add_argument("--lengths", nargs="+", help="length files (default: Wikipedia and the code-file corpus)",
                   default=[os.environ.get("SP_LENGTHS", "../shared/data/lengths/wikipedia.txt.gz"),
                            "data/lengths/code_files.txt.gz"])  # fmt: skip
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--max-len", type=int, default=262144)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale-seqs", type=int, default=4096)
    p.add_argument("--scale-nodes", type=int, default=128)
    p.add_argument("--scale-steps", type=int, default=3)
    p.add_argument(
        "--worlds",
        type=int,
        nargs="*",
        default=[24, 48, 64, 96],
        help="worlds of 8-GPU nodes vs power-of-two groups and the powers of two around them ([]: skip)",
    )
    p.add_argument("--only-worlds", action="store_true", help="only the --worlds measurement")
    m = sub.add_parser("memory", help="measured vs predicted per-rank activation and state bytes (FSDP)")
    m.add_argument("--world", type=int, nargs="+", default=[1, 2, 4, 8])
    m.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    m.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    m.add_argument("--mid-max-tokens", type=int, default=16384, help="cap for the mid model (CPU time)")
    m.add_argument("--checkpointing", nargs="+", default=["full", "none"], choices=["full", "selective", "none"])
    m.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    m.add_argument("--fsdp", action="store_true", help="only FSDP2's unsharded parameters/gradients, measured")
    m.add_argument("--techniques", nargs="+", default=["plain"], choices=["plain", "chunk", "tile", "offload", "all"])
    lc = sub.add_parser("longctx", help="one long document, one step of the real trainer (FSDP, full ckpt)")
    lc.add_argument("--tokens", type=int, default=131072)
    lc.add_argument("--world", type=int, default=8)
    lc.add_argument("--workdir", default="runs/longctx")
    lc.add_argument("--technique", default="plain", choices=["plain", "chunk", "tile", "offload", "all", "all+states"])
    ck = sub.add_parser("cpu-kernel", help="torch's fused CPU attention op vs our reference kernel (fwd+bwd)")
    ck.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128])
    ck.add_argument("--keys", type=int, nargs="+", default=[512, 4096])
    fg = sub.add_parser("flash-geometry", help="flash ring-step calls, host index time and gather bytes (CPU)")
    fg.add_argument("--tokens", type=int, nargs="+", default=[131072])
    fg.add_argument("--ring", type=int, nargs="+", default=[1, 4])
    hl = sub.add_parser("hf-load", help="peak host memory per rank while a Hugging Face checkpoint loads (FSDP)")
    hl.add_argument("--gb", type=float, default=1.0, help="size of the generated fp32 model")
    hl.add_argument("--world", type=int, default=4)
    hl.add_argument("--workdir", default="runs/hf-load")
    cc = sub.add_parser("checkpoint", help="integrity cost in save and resume: rank-0 sha256 vs parallel xxh3, async")
    cc.add_argument("--gb", type=float, default=2.0, help="state size (fp32 parameters + AdamW moments)")
    cc.add_argument("--world", type=int, default=4)
    cc.add_argument("--repeats", type=int, default=3)
    cc.add_argument("--workdir", default="runs/checkpoint-bench")
    dp = sub.add_parser("data", help="make train's steps per second under other code trees and this one")
    dp.add_argument("--tree", action="append", default=[], help="LABEL=PATH of another checkout (repeatable)")
    dp.add_argument("--steps", type=int, default=30)
    dp.add_argument("--warmup", type=int, default=3)
    dp.add_argument("--workdir", default="runs/data-bench")
    hp = sub.add_parser("content-hash", help="start-up cost of the data fingerprint's content hash (first, cached)")
    hp.add_argument("--gb", type=float, default=1.0)
    hp.add_argument("--workdir", default="runs/content-hash-bench")
    sub.add_parser("published", help="sp-plan beside the published 1M-token Qwen3-8B run, term by term")
    nl = sub.add_parser("needle-learning", help="needle accuracy of a tiny model trained on retrieval rows, by step")
    nl.add_argument("--steps", type=int, default=300)
    nl.add_argument("--lengths", type=int, nargs="+", default=[192, 256], help="the grid's task lengths")
    nl.add_argument("--lr", type=float, default=1e-3)
    nl.add_argument("--png", default=None, help="copy the last evaluation's heatmap here")
    cp = sub.add_parser("capacity", help="longest single sequence the planner places on N H100s, per technique")
    cp.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64])
    ca = sub.add_parser("cpu-adam", help="AdamW on this machine's CPUs (optimizer-state offload's update)")
    ca.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ca.add_argument("--params", type=int, default=32_000_000)
    gp = sub.add_parser("gpu", help="one-GPU check: every attention kernel vs fp64 in bf16 with its TFLOP/s, FSDP+bf16 "
                        "training steps per memory technique")  # fmt: skip
    gp.add_argument("--tokens", type=int, nargs="+", default=[16384], help="training document lengths")
    gp.add_argument("--steps", type=int, default=2)
    gp.add_argument("--out", default="runs/gpu-check", help="folder of gpu.jsonl (rows appended)")
    gp.add_argument("--kernels", nargs="+", default=None, help="kernels to check (default: torch_flash cudnn flash)")
    args = ap.parse_args(argv)
    if args.cmd == "cpu-kernel":
        from benchmarks.cpu_kernel import run as run_cpu_kernel

        for row in run_cpu_kernel(args.head_dims, args.keys):
            print(json.dumps(row), flush=True)
    elif args.cmd == "flash-geometry":
        from benchmarks.flash_geometry import run as run_geometry

        for row in run_geometry(args.tokens, args.ring):
            print(json.dumps(row), flush=True)
    elif args.cmd == "hf-load":
        from benchmarks.hf_load import run as run_hf_load

        for row in run_hf_load(args.gb, args.world, args.workdir):
            print(json.dumps(row), flush=True)
    elif args.cmd == "checkpoint":
        from benchmarks.checkpoint import run as run_checkpoint

        for row in run_checkpoint(args.gb, args.world, args.workdir, args.repeats):
            print(json.dumps(row), flush=True)
    elif args.cmd == "data":
        from benchmarks.data_path import run as run_data

        for row in run_data(args.tree, args.steps, args.warmup, args.workdir):
            print(json.dumps(row), flush=True)
    elif args.cmd == "content-hash":
        from benchmarks.content_hash import run as run_content_hash

        for row in run_content_hash(args.gb, args.workdir):
            print(json.dumps(row), flush=True)
    elif args.cmd == "needle-learning":
        from benchmarks.needle_learning import run as run_needle_learning

        for row in run_needle_learning(args.steps, tuple(args.lengths), args.lr, args.png):
            print(json.dumps(row), flush=True)
    elif args.cmd == "published":
        from benchmarks.published import run as run_published

        for row in run_published():
            print(json.dumps(row), flush=True)
    elif args.cmd == "capacity":
        from benchmarks.capacity import run as run_capacity

        for row in run_capacity(args.gpus):
            print(json.dumps(row), flush=True)
    elif args.cmd == "cpu-adam":
        from benchmarks.cpu_adam import run as run_cpu_adam

        for row in run_cpu_adam(args.params, tuple(args.threads)):
            print(json.dumps(row), flush=True)
    elif args.cmd == "gpu":
        from benchmarks.gpu import run as run_gpu

        for row in run_gpu(args.tokens, args.steps, args.out, args.kernels):
            print(json.dumps(row), flush=True)
    elif args.cmd == "longctx":
        from benchmarks.longctx import run as run_longctx

        print(json.dumps(run_longctx(args.tokens, args.world, args.workdir, args.technique)), flush=True)
    elif args.cmd == "memory" and args.fsdp:
        from benchmarks.memory import run_fsdp

        for row in run_fsdp(args.world, args.models, ["fp32", "bf16"]):
            print(json.dumps(row), flush=True)
    elif args.cmd == "memory":
        from benchmarks.memory import run as run_memory

        for row in run_memory(
            args.world,
            args.models,
            args.tokens,
            args.checkpointing,
            args.precision,
            args.mid_max_tokens,
            tuple(args.techniques),
        ):
            print(json.dumps(row), flush=True)
    elif args.cmd == "attention" and args.vs_single:
        from benchmarks.attention_overhead import run as run_overhead

        for row in run_overhead(args.tokens1, args.tokens4, args.reps):
            print(json.dumps(row), flush=True)
    elif args.cmd == "attention":
        from benchmarks.attention import run

        shapes = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)], 8: [(8, 1), (1, 8), (4, 2), (2, 4)]}
        if args.world not in shapes:
            raise SystemExit(f"--world must be one of {sorted(shapes)}, got {args.world}")
        rows = run(args.world, args.tokens, shapes[args.world])
        if args.scaling:
            for w in (1, 2):
                rows += run(w, [min(args.tokens)], shapes[w])
        for row in rows:
            print(json.dumps(row), flush=True)
    elif args.cmd == "e2e":
        from benchmarks.e2e import run as run_e2e

        print(
            json.dumps(
                run_e2e(
                    args.lengths,
                    args.steps,
                    args.tokens,
                    args.max_len,
                    args.scale,
                    args.seed,
                    args.recalibrate,
                    not args.no_static,
                )
            ),
            flush=True,  # fmt: skip
        )
    else:
        from benchmarks.planner_bench import quality, scale, worlds

        if args.worlds:
            for row in worlds(args.lengths[0], tuple(args.worlds), args.steps, args.global_batch, args.max_len,
                              args.seed):  # fmt: skip
                print(json.dumps(row), flush=True)
        if args.only_worlds:
            return
        for path in args.lengths:
            print(json.dumps(quality(path, args.steps, args.global_batch, args.max_len, args.seed)), flush=True)
        for path in args.lengths:
            for limit in (0.0, 0.8):  # the default (auto: 0.1 s x GPUs / 64), and a cap of 0.8 s
                row = scale(path, args.scale_seqs, args.scale_nodes, args.scale_steps, args.max_len, args.seed, limit)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
