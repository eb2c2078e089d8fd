"""``sp-plan``: dry-run planner for a cluster you may not have. Hydra overrides on the command line, e.g.

sp-plan cluster=a100x64_flexsp model=gpt-7b lengths.path=FILE lengths.global_batch=512 output.format=json
sp-plan cluster=h100x64 model=llama3-8b lengths.fixed=[1048576]
sp-plan cluster=h100x64 model=llama3-8b lengths.path=FILE run.tokens=2e11 cluster.usd_per_gpu_hour=2.5
"""

from __future__ import annotations

import json


def run(cfg) -> dict:  # cfg: PlanJobSchema after OmegaConf.to_object
    from cli.schema import freeze, model_shape
    from planner.calibration import calibrated, describe
    from planner.cost import CostModel
    from planner.lengths import read_lengths, sample_steps
    from planner.planner import Planner, PlannerConfig
    from planner.report import plan_json, table
    from planner.types import Cluster
    from trainer.config import TrainConfig

    if cfg.output.format not in ("table", "json"):  # checked before any planning
        raise ValueError(f"output.format={cfg.output.format!r}; valid: 'table', 'json'")
    if cfg.output.picture:
        _check_writable(cfg.output.picture)
    if not cfg.run.tokens >= 0:
        raise ValueError(f"run.tokens={cfg.run.tokens}; valid: 0 (no run estimate) or > 0, e.g. 2e11")
    sharding = freeze(TrainConfig, cfg.train).sharding  # one setting for sp-train and sp-plan
    model = model_shape(cfg.model)
    cost = CostModel(calibrated(freeze(Cluster, cfg.cluster), model, cfg.causal), model, cfg.causal, sharding)
    pcfg = freeze(PlannerConfig, cfg.planner)
    lc = cfg.lengths
    if lc.max_len_schedule:
        return _phases(cfg, cost, pcfg)
    batches: list = []
    if lc.path:  # a file wins over the fixed example batch of configs/plan.yaml
        batches = sample_steps(read_lengths(lc.path), lc.global_batch, lc.steps, lc.max_len, lc.seed, lc.clip)
    elif lc.fixed:
        batches = [list(lc.fixed)]
    else:
        raise ValueError("no lengths: set lengths.path=FILE (.txt[.gz]/.jsonl/.npy) or lengths.fixed=[N,...]")
    max_len = lc.max_len if lc.path else max(max(b) for b in batches)
    cost = _states(cost, pcfg, max_len)
    plans, summary = _plan_steps(cfg, cost, pcfg, Planner(cost, pcfg), batches, max_len)
    result = {"cluster": cost.cluster.name, "model": cost.model.name, "summary": summary}
    if cost.cluster.calibration:
        result["calibration"] = describe(cost.cluster.calibration)
    if cfg.output.format == "json":
        result["first_step"] = plan_json(plans[0], cost.model)
        print(json.dumps(result), flush=True)
    else:
        print(f"cluster {cost.cluster.name} ({cost.cluster.world} GPUs), model {cost.model.name}, {len(plans)} step(s)")
        if cost.cluster.calibration:
            print(result["calibration"])
        print(table(plans[0], summary), flush=True)
    if cfg.output.picture:  # after the result: a failing picture never loses the plan
        from planner.picture import draw_gantt

        draw_gantt(plans[0], cost, cfg.output.picture, f"{cost.cluster.name} / {cost.model.name}")
    return result


def _states(cost, pcfg, max_len: int):  # noqa: ANN001, ANN202
    """The cost model with the run's optimizer states where ``planner.state_offload`` puts them."""
    from planner.planner import memory_modes
    from planner.state_offload import resolve

    return resolve(cost, pcfg.state_offload, max_len, memory_modes(cost.model, pcfg))


def _plan_steps(cfg, cost, pcfg, planner, batches: list, max_len: int) -> tuple[list, dict]:  # noqa: ANN001
    """Each batch planned, its baselines (``output.baselines``), and the summary against ``max_len``."""
    from planner.baselines import all_baselines
    from planner.report import summarise

    plans = [planner.plan(b) for b in batches]
    bases = [all_baselines(cost, b, pcfg, p) if cfg.output.baselines else {} for b, p in zip(batches, plans)]
    return plans, summarise(cost, plans, bases, max_len, cfg.run.tokens or None)


def _phases(cfg, cost, pcfg) -> dict:  # noqa: ANN001 - the PlanJobSchema twin
    """``lengths.max_len_schedule``: each phase planned on its own pieces (documents longer than the phase's
    limit split as sp-train splits them); one summary per phase. ``summary`` is the last phase's."""
    from planner.calibration import describe
    from planner.lengths import read_lengths, sample_steps, split_lengths
    from planner.planner import Planner
    from planner.report import table
    from trainer.config import DataConfig

    lc = cfg.lengths
    sched = tuple(tuple(e) for e in lc.max_len_schedule)
    DataConfig(max_len=max(n for _, n in sched) if sched else 2, max_len_schedule=sched)  # sp-train's checks
    if not lc.path:
        raise ValueError("lengths.max_len_schedule needs a length file: set lengths.path=FILE")
    pool = read_lengths(lc.path)
    cost = _states(cost, pcfg, max(n for _, n in sched))
    planner = Planner(cost, pcfg)
    phases, firsts = [], []
    for i, (start, max_len) in enumerate(sched):
        batches = sample_steps(split_lengths(pool, max_len), lc.global_batch, lc.steps, max_len, lc.seed)
        plans, summary = _plan_steps(cfg, cost, pcfg, planner, batches, max_len)
        end = sched[i + 1][0] if i + 1 < len(sched) else None
        phases.append({"from_step": start, "to_step": end, "max_len": max_len, "summary": summary})
        firsts.append(plans[0])
        if cfg.output.format == "table":
            print(f"phase {i + 1}: steps {start}-{'' if end is None else end - 1}, max_len {max_len}: "
                  f"cluster {cost.cluster.name} ({cost.cluster.world} GPUs), model {cost.model.name}")  # fmt: skip
            print(table(plans[0], summary), flush=True)
    result = {"cluster": cost.cluster.name, "model": cost.model.name, "summary": phases[-1]["summary"],
              "phases": phases}  # fmt: skip
    if cost.cluster.calibration:
        result["calibration"] = describe(cost.cluster.calibration)
    if cfg.output.format == "json":
        print(json.dumps(result), flush=True)
    if cfg.output.picture:  # one Gantt chart per phase (its first step): PATH -> STEM_phase1.png, ...
        from pathlib import Path

        from planner.picture import draw_gantt

        out = Path(cfg.output.picture)
        for i, (plan, ph) in enumerate(zip(firsts, phases)):
            draw_gantt(plan, cost, str(out.with_name(f"{out.stem}_phase{i + 1}{out.suffix or '.png'}")),
                       f"{cost.cluster.name} / {cost.model.name}, phase {i + 1} (max_len {ph['max_len']})")  # fmt: skip
    return result


def _check_writable(path: str) -> None:
    """output.picture must be writable before minutes of planning are spent."""
    import os
    from pathlib import Path

    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or Path(path).is_dir():
        raise ValueError(f"output.picture={path!r} cannot be written (folder {str(parent)!r} missing or read-only)")


def main() -> None:
    from cli.hydra_app import run_app

    run_app(
        "plan",
        "sp-plan",
        run,
        "dry-run planner: per-step SP plans, predicted step time, memory and "
        "speed-up over static layouts for a cluster you may not have",
        ("cluster", "model", "planner", "train"),
    )


if __name__ == "__main__":
    main()
