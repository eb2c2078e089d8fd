"""``sp-train``: train a Megatron-core GPT with per-step adaptive SP plans. Hydra overrides, e.g.

    torchrun --nproc_per_node 4 -m cli.train model=tiny train.steps=50
    sp-train train.strategy=ring data.source=jsonl data.path=corpus.jsonl   # any launcher: torchrun, srun, mpiexec

SIGUSR1 (Slurm's ``--signal``) or SIGTERM makes every rank finish the current step, checkpoint and exit 0;
so does the death of the launcher process (a worker whose parent is gone stops instead of training orphaned).
The handlers are installed on the first line of :func:`main`, before torch or Hydra is imported: a signal
during start-up (imports, model build, checkpoint load, corpus scan) makes every rank exit 0 at the next
start-up safe point, before the first step, so the job requeues (:mod:`trainer.preempt`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def run(cfg, preempt: Any = None) -> None:  # cfg: TrainJobSchema after OmegaConf.to_object
    from cli.schema import freeze, model_shape
    from planner.planner import PlannerConfig
    from planner.types import Cluster
    from trainer.bootstrap import init_distributed
    from trainer.config import DataConfig, EvalConfig, TrainConfig
    from trainer.loop import Trainer, TrainJob
    from trainer.preempt import Preemption, StopBeforeStart

    job = TrainJob(
        model=model_shape(cfg.model),
        cluster=freeze(Cluster, cfg.cluster),
        planner=freeze(PlannerConfig, cfg.planner),
        data=freeze(DataConfig, cfg.data),
        train=freeze(TrainConfig, cfg.train),
        eval=freeze(EvalConfig, cfg.eval),
    )
    import torch.distributed as dist

    from cli.errors import report

    preempt = preempt or Preemption().install()
    env = init_distributed(job.train.collective_timeout_s)
    try:
        trainer = Trainer(job, preempt)
        losses = trainer.run()
    except StopBeforeStart as e:
        if env.rank == 0:
            print(f"[sp-train] stop requested: {e}; no step was run, the job requeues and starts again", flush=True)
        dist.destroy_process_group()
        return
    except ValueError as e:  # the ranks are connected: one message for the job, not one per rank
        report("sp-train", e, env.rank)
        sys.exit(2)
    if env.rank == 0:
        out = Path(job.train.out_dir).resolve()
        state = "stopped on request" if trainer.stopped else "done"
        if losses:
            print(f"[sp-train] {state} at step {trainer.step} (launcher {env.launcher}, {env.world} ranks); "
                  f"last loss {losses[-1]:.4f}")  # fmt: skip
        else:
            print(f"[sp-train] {state} at step {trainer.step}: no step was trained (train.steps="
                  f"{job.train.steps}; a finished run continues with a larger train.steps)")  # fmt: skip
        for line in artefacts(out):
            print(f"[sp-train] {line}")
    dist.destroy_process_group()


def artefacts(out: Path) -> list[str]:
    """Closing lines naming what the run wrote in ``out``: TensorBoard logs, checkpoints, the evaluation's
    pictures and JSON (the newest of each kind), plan pictures, the calibration."""
    lines = [f"TensorBoard: tensorboard --logdir {out / 'tb'}"]
    ckpts = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    lines.append(f"checkpoints: {out / 'checkpoints'}" + (f" (newest {ckpts[-1].name})" if ckpts else " (none yet)"))
    kinds: dict[str, list[Path]] = {}
    for f in sorted(out.glob("**/*.png")) + sorted((out / "eval").glob("*.json")):
        kinds.setdefault(f"{f.parent.name}/{f.stem.rsplit('_step_', 1)[0]}{f.suffix}", []).append(f)
    for kind, files in sorted(kinds.items()):
        lines.append(f"{kind}: {files[-1]}" + (f" (and {len(files) - 1} earlier)" if len(files) > 1 else ""))
    if (out / "calibration.json").is_file():
        lines.append(f"calibration (the cost model refitted on this run): {out / 'calibration.json'}")
    return lines


def main() -> None:
    from trainer.preempt import Preemption  # first: nothing heavy is imported before the handlers are in place

    preempt = Preemption().install()
    preempt.enter("start")
    import warnings

    from cli.hydra_app import run_app

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")  # "Apex is not installed" etc.
    run_app(
        "config",
        "sp-train",
        lambda cfg: run(cfg, preempt),
        "train a Megatron-core GPT with per-step adaptive sequence-parallel plans (FSDP2, checkpointing, bf16 on CUDA)",
        ("cluster", "data", "model", "planner", "train"),
    )


if __name__ == "__main__":
    main()
