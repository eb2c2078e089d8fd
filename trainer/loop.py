"""The training loop: plan one step ahead on rank 0, broadcast, execute, sync, step, observe, checkpoint."""

from __future__ import annotations

import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from planner import calibration, state_offload
from planner.calibration import calibrated
from planner.capacity import world_capacity
from planner.cost import CostModel
from planner.planner import Planner, PlannerConfig, memory_modes
from planner.static import static_plan
from planner.topology import Topology
from planner.types import Cluster, GroupShape, ModelShape, StepPlan
from sp.groups import GroupPool
from trainer import checkpoint
from trainer.calibrate import OnlineCalibrator, hardware, log_line
from trainer.config import DataConfig, EvalConfig, TrainConfig
from trainer.data.corpus import Corpus, held_out, trained_targets
from trainer.data.fingerprint import fingerprint
from trainer.data.mixture import Mixture
from trainer.eval_phase import EvalPhase
from trainer.grad_sync import GradSync
from trainer.kernel_choice import KernelChoice
from trainer.kernel_choice import choose as choose_kernel
from trainer.launch_topology import describe as describe_topology
from trainer.launch_topology import from_hosts, gathered_hosts, launch_cluster, read_launch
from trainer.memory import peak_bytes, state_bytes
from trainer.observe import Board, GpuMonitor
from trainer.optim import lr_at, schedule_change
from trainer.preempt import Preemption, budget_warning
from trainer.run_dir import RunLock, flat_config, resume_check, write_complete
from trainer.sharding import Regime, parallelize, resolve_precision
from trainer.step import StepStats, run_plan, synchronize
from trainer.watchdog import Heartbeat

MAX_MICRO_STEPS = 64  # a step that needs more is refused before any data is loaded


@dataclass(frozen=True)
class TrainJob:
    model: ModelShape
    cluster: Cluster
    planner: PlannerConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig = field(default_factory=EvalConfig)


def static_shape(job: TrainJob, world: int) -> GroupShape:
    """The one layout of a static strategy: ``train.sp_size`` GPUs per group (0: the whole world), any size
    the topology places (up to a node, or whole nodes); a size that does not divide the world leaves ranks idle."""
    t, m, cl = job.train, job.model, job.cluster
    p = t.sp_size or world
    sizes = Topology(cl.nodes, cl.gpus_per_node).sizes
    if p > world or p not in sizes:
        valid = [s for s in sizes if s <= world]
        raise ValueError(f"train.sp_size={p} on {cl.nodes} node(s) x {cl.gpus_per_node} GPUs; valid: {valid} "
                         "(a group stays inside a node or spans whole nodes)")  # fmt: skip
    if t.strategy == "hybrid" and p < 4:
        raise ValueError(
            f"strategy 'hybrid' needs groups of >= 4 GPUs (u=2 x r>=2), got {p} (train.sp_size={t.sp_size}, "
            f"world {world}); use strategy='ring' or 'ulysses'"
        )
    u = {"ulysses": p, "ring": 1, "hybrid": 2, "none": 1}[t.strategy]
    if t.strategy == "none":
        p = 1
    if u not in m.ulysses_degrees(p) or p % u or not (p <= cl.gpus_per_node or cl.gpus_per_node % u == 0):
        raise ValueError(
            f"strategy {t.strategy!r} on {p} GPUs needs Ulysses degree {u}, which the model's heads "
            f"(q heads={m.heads}, kv heads={m.n_kv_heads}) or the nodes ({cl.gpus_per_node} GPUs) do not allow; "
            f"valid Ulysses degrees: {[d for d in m.ulysses_degrees(p) if p % d == 0]}"
        )
    return GroupShape(u, p // u)


class Trainer(EvalPhase):
    def __init__(self, job: TrainJob, preempt: Preemption | None = None) -> None:
        from megatron.core import parallel_state

        from models.gpt import build_meta
        from models.shards import materialize
        from trainer import init_from, tokenizer

        self.job = job
        self.preempt = preempt or Preemption()  # the entry point installs the signal handlers on it
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        launch = read_launch(os.environ, self.world) or from_hosts(gathered_hosts())
        profile = job.cluster
        job = replace(job, cluster=launch_cluster(profile, launch))  # the planner plans for the launched nodes
        self.job = job
        if self.rank == 0:
            print(f"[sp-train] {describe_topology(profile, job.cluster, launch)}", flush=True)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1)
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.preempt.checkpoint("init", self.rank, self.device)
        t = job.train
        precision = resolve_precision(t.precision, self.device)
        self.cost = cost_model(job, precision)
        self.regime = Regime(t.sharding, precision, job.model.checkpointing, job.planner.checkpointing,
                             offload_states=self.cost.state_offload)  # fmt: skip
        if self.cost.state_offload and self.rank == 0:
            print(f"[sp-train] optimizer states in host memory (planner.state_offload={job.planner.state_offload}): "
                  f"{self.cost.host_state_gib():.3g} GiB per rank, AdamW on the host", flush=True)  # fmt: skip
        modes = memory_modes(job.model, job.planner)  # the roomiest mode the plan may pick
        cap = world_capacity(self.cost, modes)  # per layout, as the planner and planner.state_offload count it
        if job.data.max_len > cap:
            raise ValueError(
                f"data.max_len={job.data.max_len} tokens cannot be held by any plan: the whole cluster holds "
                f"{int(cap)} tokens of one sequence (cluster.memory_gib={job.cluster.memory_gib}, "
                f"model.checkpointing={job.model.checkpointing!r}); lower data.max_len or use more memory"
            )
        if job.data.tokens_per_step > MAX_MICRO_STEPS * cap:
            raise ValueError(
                f"data.tokens_per_step={job.data.tokens_per_step} needs more than {MAX_MICRO_STEPS} micro-steps: the "
                f"cluster holds about {int(cap)} tokens at once (cluster.memory_gib={job.cluster.memory_gib}, "
                f"{self.world} GPUs); valid: data.tokens_per_step <= {int(MAX_MICRO_STEPS * cap)}"
            )
        # checked before anything is built or written: the weights' source (rank 0 reads the headers or
        # verifies the run's checkpoint once, every rank gets the verdict), the tokenizer against the vocab
        self.lock: RunLock | None = None  # taken later, by _claim_folder
        self.source: init_from.Source = self._agree(
            lambda: init_from.source(t.init_from, job.model, t.allow_unexpected_weights)
        )
        if job.data.tokenizer:
            tokenizer.load(job.data.tokenizer, job.model.vocab)
        self.shape = None if t.strategy == "adaptive" else static_shape(job, self.world)
        if self.shape is not None and self.rank == 0:
            groups = Topology(job.cluster.nodes, job.cluster.gpus_per_node).max_groups(self.shape.size)
            idle = self.world - groups * self.shape.size
            print(
                f"[sp-train] static layout {self.shape}: {groups} group(s) of {self.shape.size}"
                + (f", {idle} rank(s) idle (train.sp_size does not fill the nodes)" if idle else ""),
                flush=True,
            )
        self.planner = Planner(self.cost, job.planner)
        self.fallback = Planner(self.cost, replace(job.planner, use_milp=False))  # a late plan's stand-in
        # fp32 master parameters everywhere; bf16 compute comes from FSDP's policy or autocast (replicate).
        # Built on the meta device and sharded first: each rank materialises and fills only its own rows.
        meta = build_meta(job.model, job.data.max_len, modes=modes)
        self.model = materialize(parallelize(meta, self.regime, self.device), self.regime.state_device(self.device))
        self.autocast = torch.bfloat16 if (self.regime.precision == "bf16" and t.sharding == "replicate") else None
        m = job.model
        self.kernel: KernelChoice = self._agree(
            lambda: choose_kernel(
                t.kernel, self.device, self.regime.compute_dtype, job.data.max_len, m.heads, m.n_kv_heads, m.d_head
            )
        )
        if self.rank == 0:
            print(f"[sp-train] attention kernel: {self.kernel.why}", flush=True)
        self.pool = GroupPool(max_per_rank=job.cluster.max_communicators)  # groups made as micro-steps need them
        self.sync = GradSync(list(self.model.parameters()), t.bucket_mb) if t.sharding == "replicate" else None
        self.optim = self._optimizer()
        self.saver = checkpoint.Saver(t.out_dir, t.async_checkpoint)
        self.preempt.checkpoint("build", self.rank, self.device)
        corpora = [Corpus(src, job.data.tokenizer) for src in job.data.mixture()]
        self.heldout = [held_out(c, job.eval.holdout, job.data.seed) for c in corpora]  # validation only
        self.loader = Mixture(corpora, job.data, exclude=self.heldout)
        self.eval_corpora = [Corpus(src, job.data.tokenizer) for src in job.eval.sources]
        clash = {c.src.name for c in corpora} & {c.src.name for c in self.eval_corpora}
        if clash:
            raise ValueError(f"eval.sources names {sorted(clash)} are training sources too (their held-out "
                             "documents are evaluated under that name): rename the eval sources")  # fmt: skip
        self.data_fingerprint = fingerprint(corpora)
        self.preempt.checkpoint("data", self.rank, self.device)
        self.out = Path(job.train.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.tokens_trained = 0  # targets trained on, over the whole run (kept in checkpoints)
        self.bad_in_row = 0
        self.skipped_steps = 0  # steps with no trained target (this process's run)
        self.stopped = False
        self.heartbeat = Heartbeat(self.rank, self.world)
        self._parent = os.getppid()  # the launcher (torchrun's agent, srun, mpiexec, the spawn harness)
        self.config = flat_config(job)
        ck = self._claim_folder()
        try:
            self._start(ck)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _start(self, ck: Path | None) -> None:
        """Load the resume point or the first weights, then the last start-up safe point."""
        from trainer import init_from

        job, t = self.job, self.job.train
        if ck is not None:
            extra = checkpoint.load(ck, self.model, self.optim)
            self.step = int(extra["step"])
            self.tokens_trained = int(extra.get("tokens_trained", 0))
            self.loader.load_state(extra["loader"], self.step)
            if self.rank == 0:
                print(f"[sp-train] resumed from {ck} (step {self.step})")
        else:
            t0 = time.perf_counter()
            init_from.initialise(self.model, self.source, job.model, t.seed)
            if self.rank == 0:
                print(f"[sp-train] {self.source.describe()} ({time.perf_counter() - t0:.1f} s)")
        self.preempt.checkpoint("load", self.rank, self.device)
        if self.rank == 0:
            self._record_sources()
        self.board = Board(str(self.out / "tb")) if self.rank == 0 else None
        self.gpu = GpuMonitor() if self.rank == 0 else None
        self.pool_exec = ThreadPoolExecutor(max_workers=1) if self.rank == 0 else None
        self.calibrator = self._calibrator(ck is not None) if self.rank == 0 else None
        self.late_plans = 0
        self.last_values: dict[str, float] = {}  # rank 0: the last logged scalars
        self.last_plan: StepPlan | None = None
        self.step_times: list[float] = []
        self.state_bytes = 0  # this rank's parameter + gradient + AdamW bytes after the last optimizer step
        if self.rank == 0:
            self._data_summary()
        stats = checkpoint.save_stats(t.out_dir) if self.rank == 0 and ck is not None else None
        if stats is not None:  # resumed: the last run's slowest step and save against the warning a signal gives
            self._warn_budget(stats.get("slowest_step_s", 0.0), stats)

    def _calibrator(self, resumed: bool) -> OnlineCalibrator | None:
        """Rank 0's online calibration. ``cluster.calibration=FILE`` was applied by :func:`cost_model`; a resumed
        run without one continues from its own last fit (the run folder's ``calibration.json``)."""
        job, mine = self.job, self.out / "calibration.json"
        if resumed and not job.cluster.calibration and mine.is_file():
            job = replace(job, cluster=replace(job.cluster, calibration=str(mine)))
            self._use_cost(cost_model(job, self.regime.precision))
        if job.cluster.calibration:
            print(f"[sp-train] {calibration.describe(job.cluster.calibration)}: planning from its constants")
        if not job.planner.recalibrate_every:
            return None
        return OnlineCalibrator(self.cost, job.planner, self.out, hardware(self.device, self.world, job.cluster.name))

    def _use_cost(self, cost: CostModel) -> None:
        """Plan the following steps with ``cost`` (rank 0 plans; the other ranks receive its plans)."""
        self.cost = cost
        self.planner = Planner(cost, self.job.planner)
        self.fallback = Planner(cost, replace(self.job.planner, use_milp=False))
        self.__dict__.pop("_eval_planner", None)

    def _calibrate(self, plan: StepPlan, busy: np.ndarray, attention: np.ndarray, wait: np.ndarray,
                   step_s: float) -> dict[str, float]:  # fmt: skip
        """Rank 0: the step joins the calibration window; every ``planner.recalibrate_every`` steps a re-fit.
        Returns the TensorBoard scalars (predicted step time, its error, the constants after a fit)."""
        cal = self.calibrator
        if cal is None:
            return {}
        predicted = cal.predicted_s(plan)  # the model this plan was made with
        err = cal.record(self.step, plan, busy, attention, step_s)
        values = {"time/step_predicted_s": predicted, "calib/step_error": err,
                  "calib/step_error_median10": cal.running_error(), "time/attention_s": float(attention.max(0).sum()),
                  "time/comm_wait_s": float(wait.max(0).sum())}  # fmt: skip
        if cal.due(self.step):
            res = cal.refit(self.step)
            print(log_line(self.step, res), flush=True)
            if res.accepted:
                self._use_cost(res.cost)
            assert self.board is not None
            self.board.scalars(self.step, {"calib/fit_accepted": float(res.accepted), **cal.scalars()})  # every fit
        return values

    def _claim_folder(self) -> Path | None:
        """Rank 0 locks the run folder and removes a stale COMPLETE; every rank verifies its share of the
        newest checkpoints; rank 0 picks the one to resume (the newest intact one whose config and data allow
        it). Every rank gets each verdict."""
        self._agree(lambda: self._lock_folder())
        if not self.job.train.resume:
            return None
        ck, warnings = checkpoint.newest_intact(str(self.out), collective=True)
        found = self._agree(lambda: self._resume_point(ck, warnings))
        return Path(found) if found is not None else None

    def _lock_folder(self) -> None:
        self.lock = RunLock(self.out)
        (self.out / "COMPLETE").unlink(missing_ok=True)

    def _agree(self, decide: Any) -> Any:
        """Rank 0 runs ``decide``; every rank returns its result or raises its RuntimeError/ValueError (the
        run folder's lock is released first)."""
        verdict: list = [None, None]
        if self.rank == 0:
            try:
                verdict[0] = decide()
            except (RuntimeError, ValueError) as e:
                verdict[1] = (type(e).__name__, str(e))
        dist.broadcast_object_list(verdict, src=0)
        if verdict[1] is not None:
            if self.lock is not None:
                self.lock.release()
            raise {"RuntimeError": RuntimeError, "ValueError": ValueError}[verdict[1][0]](verdict[1][1])
        return verdict[0]

    def _resume_point(self, ck: Path | None, warnings: list[str]) -> str | None:
        for w in warnings:
            print(f"[sp-train] WARNING: {w}")
        if ck is None:
            if warnings:
                print("[sp-train] WARNING: no intact checkpoint left: starting from step 0")
            return None
        stored = checkpoint.stored_config(ck)
        for line in resume_check(self.out, ck.name, stored, self.config, checkpoint.stored_data(ck),
                                 self.data_fingerprint):  # fmt: skip
            print(f"[sp-train] {line}")
        if "train.steps" in stored:  # a changed step count reshapes the schedule: say how
            old = replace(self.job.train, steps=int(stored["train.steps"]))
            change = schedule_change(old, self.job.train, int(ck.name.removeprefix("step_")))
            if change:
                print(f"[sp-train] {change}")
        return str(ck)

    def _record_sources(self) -> None:
        """Keep what ``sp-export`` needs in the run folder: the tokenizer's files and the source model's
        config.json (token ids and other fields the export carries over)."""
        from models.hf.export import RUN_HF_CONFIG, RUN_TOKENIZER
        from trainer import tokenizer

        if self.job.data.tokenizer:
            tokenizer.record(self.job.data.tokenizer, self.out / RUN_TOKENIZER)
        hf = self.job.model.hf_path or (str(self.source.path) if self.source.kind == "hf" else None)
        if hf and (Path(hf) / "config.json").is_file():
            shutil.copy2(Path(hf) / "config.json", self.out / RUN_HF_CONFIG)

    def request_stop(self) -> None:
        """Signal-safe: finish the current step, checkpoint, and return from :meth:`run`."""
        self.preempt.request()

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW on the fp32 (sharded) parameters (:mod:`trainer.optim`)."""
        from trainer import optim

        return optim.build(self.model, self.job.train, self.device.type == "cuda", self.regime.offload_states)

    def _plan(self, lengths: list[int]) -> StepPlan:
        if self.shape is not None:
            return static_plan(self.cost, lengths, self.shape)
        return self.planner.plan(lengths)

    def _await(self, fut: Future, lengths: list[int]) -> StepPlan:
        """The planned step, or the greedy plan when the planner is late beyond ``train.plan_timeout_s``
        (the stuck search keeps its thread; planning moves to a fresh one)."""
        try:
            return fut.result(timeout=self.job.train.plan_timeout_s)
        except FutureTimeout:
            self.late_plans += 1
            print(f"[sp-train] step {self.step}: plan late beyond train.plan_timeout_s="
                  f"{self.job.train.plan_timeout_s} s; using the greedy plan ({self.late_plans} so far)")  # fmt: skip
            assert self.pool_exec is not None
            self.pool_exec.shutdown(wait=False)
            self.pool_exec = ThreadPoolExecutor(max_workers=1)
            return self.fallback.plan(lengths) if self.shape is None else self._plan(lengths)

    def _broadcast(self, fut: Future | None, lengths: list[int]) -> StepPlan:
        box: list = [self._await(fut, lengths) if fut is not None else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run(self) -> list[float]:
        try:
            return self._run()
        finally:
            self.saver.close()  # an in-flight save completes (or raises) before the folder is released
            if self.lock is not None:
                self.lock.release()

    def _train_step(self, fut: Future | None, docs: list[np.ndarray], losses: list[float], bar: Any) -> tuple:
        """One optimizer step; returns (the next step's plan future, its documents, whether to stop). Each
        collective phase reports to the heartbeat first."""
        if not docs:
            return self._skip_step(bar)
        t = self.job.train
        t0 = time.perf_counter()
        hb = self.heartbeat
        hb.beat("plan broadcast", self.step)
        plan = self.last_plan = self._broadcast(fut, [len(d) - 1 for d in docs])
        loader_state, nxt, fut = self._draw_next()
        count = bool(t.memory_every) and self.step % t.memory_every == 0
        stats = run_plan(
            self.model, self.pool, plan, docs, self.rank, self.sync, kernel=self.kernel.name, autocast=self.autocast,
            count_saved=count, heartbeat=hb.beat,
        )  # fmt: skip
        hb.beat("loss all-reduce")
        tokens = sum(len(d) - 1 for d in docs)
        loss_t = stats.loss_sum.reshape(1).clone()  # on the model's device: NCCL has no CPU tensors
        dist.all_reduce(loss_t)
        loss = loss_t.item() / max(1, trained_targets(docs))  # the mean over trained (unmasked) targets
        if math.isfinite(loss):
            self.bad_in_row = 0
            for g in self.optim.param_groups:
                g["lr"] = lr_at(self.step, t)
            hb.beat("gradient norm and optimizer step")
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
            self.optim.step()
            self._check_finite()
            if self.board is not None and self.step % t.log_every == 0:  # logged: grads still held here
                self.state_bytes = sum(state_bytes(self.model, self.optim).values())
        else:
            self.bad_in_row += 1
            grad_norm = float("nan")
            if self.rank == 0:
                print(f"[sp-train] step {self.step}: non-finite loss {loss}, step skipped ({self.bad_in_row} in a row)")
            if self.bad_in_row >= t.max_bad_steps:
                raise RuntimeError(
                    f"{self.bad_in_row} non-finite losses in a row (limit train.max_bad_steps={t.max_bad_steps}); "
                    "lower train.lr or check the data"
                )
        self.optim.zero_grad(set_to_none=True)
        synchronize(self.device)
        step_s = time.perf_counter() - t0
        self.step_times.append(step_s)
        self.tokens_trained += tokens if math.isfinite(loss) else 0
        losses.append(loss)
        hb.beat("metrics")
        self._observe(plan, loss, tokens, step_s, stats, grad_norm, Mixture.counters(loader_state))
        self.step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / step_s:.0f}")
        return self._end_step(loader_state, fut, nxt, docs)

    def _draw_next(self) -> tuple[dict, list[np.ndarray] | None, Future | None]:
        """The loader's position before the next step's documents, those documents (None after the last step),
        and their plan, started in the background."""
        loader_state = self.loader.state()
        nxt = self.loader.next_step() if self.step + 1 < self.job.train.steps else None
        self._data_events()
        return loader_state, nxt, self._plan_ahead(nxt)

    def _plan_ahead(self, docs: list[np.ndarray] | None) -> Future | None:
        """The plan of ``docs`` on the planner thread (rank 0); None elsewhere or for a step with no documents."""
        return self.pool_exec.submit(self._plan, [len(d) - 1 for d in docs]) if (self.pool_exec and docs) else None

    def _skip_step(self, bar: Any) -> tuple:
        """A step whose pieces all lack a trained target: no forward, no optimizer step, no tokens counted;
        logged as skipped, and the run stops once such steps exceed ``train.max_skipped_share`` of its steps."""
        t = self.job.train
        self.skipped_steps += 1
        report = self.loader.untrained_report()
        if self.rank == 0:
            print(f"[sp-train] step {self.step}: skipped, no piece has a trained target ({report}; "
                  f"{self.skipped_steps} skipped so far)")  # fmt: skip
        if self.skipped_steps > t.max_skipped_share * t.steps:
            raise ValueError(
                f"{self.skipped_steps} of the {self.step + 1} steps so far had no trained target (limit "
                f"train.max_skipped_share={t.max_skipped_share} of train.steps={t.steps}): {report}, each longer "
                f"than data.max_len={self.job.data.max_len_at(self.step)} so its pieces are all prompt. Raise "
                "data.max_len, set data.long_docs=reject, or shorten those prompts"
            )  # fmt: skip
        if self.board is not None:
            self.board.scalars(self.step, {"train/skipped_steps": float(self.skipped_steps)})
        loader_state, nxt, fut = self._draw_next()
        self.step += 1
        if bar is not None:
            bar.update(1)
        return self._end_step(loader_state, fut, nxt, [])

    def _end_step(self, loader_state: dict, fut: Future | None, nxt: list | None, docs: list) -> tuple:
        """After a step: the launcher and stop checks, evaluation and checkpoints; (next plan future, next
        documents, whether to stop)."""
        t = self.job.train
        hb = self.heartbeat
        if os.getppid() != self._parent and not self.preempt.requested:  # the launcher died (e.g. torchrun's
            # agent killed by a signal it does not forward): checkpoint and stop instead of training orphaned
            print(f"[sp-train] rank {self.rank}: launcher (pid {self._parent}) is gone; checkpointing and stopping")
            self.preempt.request()
        hb.beat("stop flag", self.step - 1)
        self.preempt.enter("step", self.rank)
        self.stopped = self.preempt.agreed(self.device)  # every rank stops at the same step
        # the last step always checkpoints (a finished run never loses its weights), others every N
        periodic = self.step == t.steps or (t.checkpoint_every and self.step % t.checkpoint_every == 0)
        ev = self.job.eval
        if ev.every and (self.step % ev.every == 0 or self.step == t.steps):
            hb.beat("evaluation", self.step - 1)
            self.evaluate()
            if "needle" in ev.tasks:
                self.evaluate_needle()
        if periodic or self.stopped:
            hb.beat("checkpoint save", self.step - 1)
            self._save(loader_state, final=self.stopped or self.step == t.steps)
            if not self.stopped and self.step < t.steps:  # a request that came during the write: stop now
                self.stopped = self.preempt.agreed(self.device)
        if self.stopped:
            if self.rank == 0:
                print(f"[sp-train] stop requested: checkpointed step {self.step}, exiting for requeue")
            return fut, docs, True
        return fut, (nxt if nxt is not None else docs), False

    def _data_summary(self) -> None:
        """Rank 0, at start: each source's documents, weight, held-out and skipped counts, and the schedule."""
        for line in self.loader.describe([len(h) for h in self.heldout]):
            print(f"[sp-train] {line}")
        self._data_events()

    def _data_events(self) -> None:
        for event in self.loader.take_events():
            if self.rank == 0:
                print(f"[sp-train] data: {event}", flush=True)

    def _save(self, loader_state: dict, final: bool) -> None:
        """Checkpoint this step (the last save of a run or a stop is complete on return, async or not)."""
        slowest = max(self.step_times[-50:] + [self.last_plan.time_s if self.last_plan else 0.0])
        self.saver.context = {"slowest_step_s": slowest}  # recorded with the save's timings for a resume
        extra = {"loader": loader_state, "tokens_trained": self.tokens_trained}
        self.saver.save(self.step, self.model, self.optim, extra, self.config,
                        self.data_fingerprint, during=lambda: self.preempt.enter("save", self.rank))  # fmt: skip
        if final:
            self.saver.wait()
        if self.rank == 0 and not self.saver.in_flight and "total_s" in self.saver.last:
            self._warn_budget(slowest, self.saver.last)

    def _warn_budget(self, step_s: float, save: dict[str, float]) -> None:
        warning = budget_warning(step_s, save["total_s"], self.job.train.preempt_warning_s)
        if warning and not getattr(self, "_budget_warned", False):
            self._budget_warned = True
            print(f"[sp-train] WARNING: {warning}", flush=True)

    def _run(self) -> list[float]:
        t = self.job.train
        losses: list[float] = []
        docs = self.loader.next_step()
        self._data_events()
        fut = self._plan_ahead(docs)
        bar = None
        if self.rank == 0 and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc="sp-train", dynamic_ncols=True)
        while self.step < t.steps:
            with self.heartbeat.watch():
                fut, docs, done = self._train_step(fut, docs, losses, bar)
            if done:
                break
        if bar is not None:
            bar.close()
        if self.board is not None:
            self.board.close()
        if self.rank == 0 and self.step >= t.steps and not self.stopped:
            write_complete(self.out, self.step, self.config)  # launchers: no requeue needed
        return losses

    def _check_finite(self) -> None:
        """Stop before a non-finite parameter can reach a checkpoint (e.g. lr=inf or min_lr=nan)."""
        bad = torch.zeros(1, device=self.device)
        for p in self.model.parameters():  # counted on the device: one host sync per step, not per tensor
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local)).any()
        dist.all_reduce(bad)
        if bad.item():
            raise RuntimeError(
                f"step {self.step}: {int(bad.item())} parameter tensor(s) hold NaN/inf after the optimizer step "
                f"(train.lr={self.job.train.lr}, train.min_lr={self.job.train.min_lr}); stopping before any "
                f"checkpoint is written (the last good one is in {self.out / 'checkpoints'})"
            )

    def _observe(self, plan: StepPlan, loss: float, tokens: int, step_s: float, stats: StepStats, gnorm: float,
                 data: dict[str, float]) -> None:  # fmt: skip
        t = self.job.train
        n_micro = len(stats.busy_s)
        blocks = (stats.busy_s, stats.saved_bytes, stats.offloaded_bytes, stats.attention_s, stats.comm_wait_s)
        mine = torch.tensor([[float(v) for b in blocks for v in b]], dtype=torch.float64)  # [1, 5 x micro-steps]
        gathered = torch.zeros(self.world, 5 * n_micro, dtype=torch.float64, device=self.device)
        dist.all_gather_single(gathered, mine.to(self.device))  # [world, busy | saved | offloaded | attn | wait]
        gathered = gathered.cpu()
        busy, attention, wait = (gathered[:, i * n_micro : (i + 1) * n_micro].numpy() for i in (0, 3, 4))
        calib = self._calibrate(plan, busy, attention, wait, step_s)  # each [world, micro-steps]
        if self.board is None or self.step % t.log_every:
            return
        imbalance = []
        for i, micro in enumerate(plan.micro_steps):
            times = [float(gathered[g.first_rank : g.first_rank + g.shape.size, i].max()) for g in micro.groups]
            imbalance.append(max(times) / (sum(times) / len(times)) if sum(times) > 0 else 1.0)
        mix = {s: 0 for s in ("none", "ulysses", "ring", "hybrid")}
        for micro in plan.micro_steps:
            for g in micro.groups:
                mix[g.shape.strategy] += 1
        mfu, planned_mfu = self.cost.mfu(plan.lengths, step_s, self.world), self.cost.mfu(plan.lengths, plan.time_s,
                                                                                        self.world)  # fmt: skip
        values = {
            "train/loss": loss,  # the language-model loss (MoE: without the load-balancing term, logged below)
            "train/tokens_per_s": tokens / step_s,
            "train/tokens_per_s_per_gpu": tokens / step_s / self.world,
            "train/tokens_trained": float(self.tokens_trained),
            "perf/mfu_measured": mfu,
            "perf/mfu_predicted": planned_mfu,
            "train/grad_norm": gnorm,
            "train/lr": lr_at(self.step, t),
            "time/step_measured_s": step_s,
            "time/step_predicted_s": plan.time_s,
            **({"train/moe_aux_loss": float(stats.aux_loss)} if torch.is_tensor(stats.aux_loss) else {}),
            "planner/solve_s": plan.solve_s,
            "planner/gap": plan.gap,
            "plan/groups": float(sum(len(m.groups) for m in plan.micro_steps)),
            "plan/micro_steps": float(len(plan.micro_steps)),
            "plan/load_imbalance": float(np.mean(imbalance)),
            "memory/peak_gib": peak_bytes(self.device) / 2**30,
            "memory/states_gib": self.state_bytes / 2**30,
            "memory/states_predicted_gib": self.cost.state_bytes(0) / 2**30,  # on the GPU or, offloaded, the host
            "memory/states_on_host": float(self.cost.state_offload),
            "planner/late_plans": float(self.late_plans),
            **{f"plan/strategy_{k}": float(v) for k, v in mix.items()},
            "data/max_len": float(self.job.data.max_len_at(self.step)),
            **data,
            **calib,
        }
        if stats.saved_bytes and any(stats.saved_bytes):
            saved = gathered[:, n_micro : 2 * n_micro]  # [world, micro-steps]
            values["memory/saved_for_backward_gib_max"] = float(saved.max()) / 2**30
            offloaded = float(gathered[:, 2 * n_micro :].max())
            if offloaded:
                values["memory/offloaded_gib_max"] = offloaded / 2**30
                values["memory/offloaded_predicted_gib_max"] = plan_offload_gib(plan, self.cost)
            values["memory/saved_for_backward_predicted_gib_max"] = plan_activation_gib(plan, self.cost)
            print(f"[sp-train] step {self.step} memory per rank: saved for backward "
                  f"{values['memory/saved_for_backward_gib_max']:.4f} GiB (predicted "
                  f"{values['memory/saved_for_backward_predicted_gib_max']:.4f}), states "
                  f"{values['memory/states_gib']:.4f} GiB (predicted {values['memory/states_predicted_gib']:.4f}), "
                  f"peak {values['memory/peak_gib']:.3f} GiB")  # fmt: skip
        if self.gpu is not None:
            values.update(self.gpu.read())
        self.last_values = values
        self.board.scalars(self.step, values)
        if not t.progress:  # no bar (batch logs): one line a logged step
            err = f", error {calib['calib/step_error_median10']:.0%}" if calib else ""
            print(f"[sp-train] step {self.step + 1}/{t.steps} loss {loss:.6f} {tokens / step_s:.0f} tok/s "
                  f"({tokens / step_s / self.world:.0f}/GPU) {step_s:.2f} s (planned "
                  f"{values['time/step_predicted_s']:.2f} s{err}) "
                  f"MFU {100 * mfu:.1f}% (planned {100 * planned_mfu:.1f}%)", flush=True)  # fmt: skip
        if t.picture_every and self.step % t.picture_every == 0:
            self.board.picture(self.step, plan, self.cost)


def _full(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a DTensor over FSDP shards."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def cost_model(job: TrainJob, precision: str) -> CostModel:
    """The planner's cost model of this job: states from ``train.sharding`` (the one setting sp-plan reads
    too), activation bytes from the resolved precision."""
    model = replace(job.model, bytes_per_value=2 if precision == "bf16" else 4)
    cost = CostModel(calibrated(job.cluster, model), model, sharding=job.train.sharding)
    return state_offload.resolve(cost, job.planner.state_offload, job.data.max_len, memory_modes(model, job.planner))


def plan_activation_gib(plan: StepPlan, cost: CostModel) -> float:
    """The planner's predicted bytes saved for backward on the busiest rank of the plan (each micro-step
    under its own memory mode)."""
    return max(cost.for_micro(m).activation_gib(
               sum(plan.lengths[s] for s in g.seqs), g.shape.size, g.shape.ulysses)
               for m in plan.micro_steps for g in m.groups)  # fmt: skip


def plan_offload_gib(plan: StepPlan, cost: CostModel) -> float:
    """The planner's predicted bytes in host memory on the busiest rank (offload micro-steps only)."""
    return max(cost.for_micro(m).host_bytes_per_token()
               * sum(plan.lengths[s] for s in g.seqs) / g.shape.size / 2**30
               for m in plan.micro_steps for g in m.groups)  # fmt: skip


def train(job: TrainJob) -> list[float]:
    return Trainer(job).run()
