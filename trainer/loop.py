"""The training loop: plan one step ahead on rank 0, broadcast, execute, sync, step, observe, checkpoint."""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from planner.cost import CostModel
from planner.planner import Planner, PlannerConfig
from planner.static import static_plan
from planner.types import Cluster, GroupShape, ModelShape, StepPlan
from sp.groups import GroupPool
from trainer import checkpoint
from trainer.config import DataConfig, TrainConfig
from trainer.data import Corpus, StepLoader
from trainer.grad_sync import GradSync
from trainer.observe import Board, GpuMonitor, memory_gib
from trainer.step import run_plan


@dataclass(frozen=True)
class TrainJob:
    model: ModelShape
    cluster: Cluster
    planner: PlannerConfig
    data: DataConfig
    train: TrainConfig


def static_shape(job: TrainJob, world: int) -> GroupShape:
    t, m = job.train, job.model
    p = t.sp_size or world
    if world % p:
        raise ValueError(f"train.sp_size={p} does not divide the world of {world} ranks")
    u = {"ulysses": p, "ring": 1, "hybrid": 2 if p >= 4 else 1, "none": 1}[t.strategy]
    if t.strategy == "none":
        p = 1
    if u not in m.ulysses_degrees(p):
        raise ValueError(
            f"strategy {t.strategy!r} on {p} GPUs needs Ulysses degree {u}, which the model's heads "
            f"(q heads={m.heads}, kv heads={m.n_kv_heads}) do not allow; valid Ulysses degrees: {m.ulysses_degrees(p)}"
        )
    return GroupShape(u, p // u)


def lr_at(step: int, t: TrainConfig) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


class Trainer:
    def __init__(self, job: TrainJob) -> None:
        from megatron.core import parallel_state

        from models.gpt import build_gpt

        self.job = job
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if job.cluster.world != self.world:
            job = replace(job, cluster=replace(job.cluster, nodes=1, gpus_per_node=self.world))
            self.job = job
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1)
        self.cost = CostModel(job.cluster, job.model)
        cap = self.cost.tokens_capacity(self.world)
        if job.data.max_len > cap:
            raise ValueError(
                f"data.max_len={job.data.max_len} tokens cannot be held by any plan: the whole cluster holds "
                f"{int(cap)} tokens of one sequence (cluster.memory_gib={job.cluster.memory_gib}, "
                f"model.checkpointing={job.model.checkpointing!r}); lower data.max_len or use more memory"
            )
        self.shape = None if job.train.strategy == "adaptive" else static_shape(job, self.world)
        self.planner = Planner(self.cost, job.planner)
        cuda = torch.cuda.is_available()  # fp32 on CPU, bf16 on CUDA (the GPU path is not exercised by CI)
        self.model = build_gpt(
            job.model, job.data.max_len, seed=job.train.seed, dtype=torch.bfloat16 if cuda else torch.float32
        )
        if cuda:
            self.model = self.model.to(f"cuda:{torch.cuda.current_device()}")
        self.pool = GroupPool()
        self.sync = GradSync(list(self.model.parameters()), job.train.bucket_mb)
        self.optim = self._optimizer()
        self.loader = StepLoader(Corpus(job.data), job.data)
        self.out = Path(job.train.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.bad_in_row = 0
        self.stopped = False
        self._stop_flag = False
        if job.train.resume and (ck := checkpoint.latest(str(self.out))) is not None:
            extra = checkpoint.load(ck, self.model, self.optim)
            self.step = int(extra["step"])
            self.loader.load_state(extra["loader"])
            if self.rank == 0:
                print(f"[sp-train] resumed from {ck} (step {self.step})")
        self.board = Board(str(self.out / "tb")) if self.rank == 0 else None
        self.gpu = GpuMonitor() if self.rank == 0 else None
        self.pool_exec = ThreadPoolExecutor(max_workers=1) if self.rank == 0 else None
        if self.rank == 0 and (self.loader.split or self.loader.rejected):
            print(f"[sp-train] documents longer than data.max_len={job.data.max_len}: "
                  f"{self.loader.split} split, {self.loader.rejected} rejected")  # fmt: skip

    def request_stop(self) -> None:
        """Signal-safe: finish the current step, checkpoint, and return from :meth:`run`."""
        self._stop_flag = True

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.job.train
        params = list(self.model.parameters())
        fused = _apex_fused_adam() if torch.cuda.is_available() else None
        if fused is not None:
            return fused(params, lr=t.lr, weight_decay=t.weight_decay, adam_w_mode=True)
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def _plan(self, lengths: list[int]) -> StepPlan:
        if self.shape is not None:
            return static_plan(self.cost, lengths, self.shape)
        return self.planner.plan(lengths)

    def _broadcast(self, fut: Future | None) -> StepPlan:
        box: list = [fut.result() if fut is not None else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run(self) -> list[float]:
        t = self.job.train
        losses: list[float] = []
        docs = self.loader.next_step()
        fut = self.pool_exec.submit(self._plan, [len(d) - 1 for d in docs]) if self.pool_exec else None
        bar = None
        if self.rank == 0 and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc="sp-train", dynamic_ncols=True)
        while self.step < t.steps:
            t0 = time.perf_counter()
            plan = self._broadcast(fut)
            loader_state = self.loader.state()
            nxt = self.loader.next_step() if self.step + 1 < t.steps else None
            fut = self.pool_exec.submit(self._plan, [len(d) - 1 for d in nxt]) if (self.pool_exec and nxt) else None
            loss_sum, busy = run_plan(self.model, self.pool, plan, docs, self.rank, self.sync)
            tokens = sum(len(d) - 1 for d in docs)
            stats = torch.tensor([loss_sum.item()], dtype=torch.float64)
            dist.all_reduce(stats)
            loss = stats.item() / tokens
            if math.isfinite(loss):
                self.bad_in_row = 0
                for g in self.optim.param_groups:
                    g["lr"] = lr_at(self.step, t)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
                self.optim.step()
            else:
                self.bad_in_row += 1
                grad_norm = float("nan")
                if self.rank == 0:
                    print(
                        f"[sp-train] step {self.step}: non-finite loss {loss}, "
                        f"step skipped ({self.bad_in_row} in a row)"
                    )
                if self.bad_in_row >= t.max_bad_steps:
                    raise RuntimeError(
                        f"{self.bad_in_row} non-finite losses in a row (limit train.max_bad_steps={t.max_bad_steps}); "
                        "lower train.lr or check the data"
                    )
            self.optim.zero_grad(set_to_none=True)
            step_s = time.perf_counter() - t0
            losses.append(loss)
            self._observe(plan, loss, tokens, step_s, busy, grad_norm)
            self.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / step_s:.0f}")
            flag = torch.tensor([1.0 if self._stop_flag else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            self.stopped = bool(flag.item())
            periodic = t.checkpoint_every and (self.step % t.checkpoint_every == 0 or self.step == t.steps)
            if periodic or self.stopped:
                checkpoint.save(str(self.out), self.step, self.model, self.optim, {"loader": loader_state})
            if self.stopped:
                if self.rank == 0:
                    print(f"[sp-train] stop requested: checkpointed step {self.step}, exiting for requeue")
                break
            if nxt is not None:
                docs = nxt
        if bar is not None:
            bar.close()
        if self.board is not None:
            self.board.close()
        if self.rank == 0 and self.step >= t.steps:
            (self.out / "COMPLETE").write_text(f"{self.step}\n")  # launchers: no requeue needed
        return losses

    def _observe(
        self, plan: StepPlan, loss: float, tokens: int, step_s: float, busy: list[float], gnorm: float
    ) -> None:
        t = self.job.train
        gathered = torch.zeros(self.world, len(busy), dtype=torch.float64)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, torch.tensor(busy, dtype=torch.float64)[None].contiguous())
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
        values = {
            "train/loss": loss,
            "train/tokens_per_s": tokens / step_s,
            "train/grad_norm": gnorm,
            "train/lr": lr_at(self.step, t),
            "time/step_measured_s": step_s,
            "time/step_predicted_s": plan.time_s,
            "planner/solve_s": plan.solve_s,
            "planner/gap": plan.gap,
            "plan/groups": float(sum(len(m.groups) for m in plan.micro_steps)),
            "plan/micro_steps": float(len(plan.micro_steps)),
            "plan/load_imbalance": float(np.mean(imbalance)),
            "memory/peak_gib": memory_gib(),
            **{f"plan/strategy_{k}": float(v) for k, v in mix.items()},
        }
        if self.gpu is not None:
            values.update(self.gpu.read())
        self.board.scalars(self.step, values)
        if t.picture_every and self.step % t.picture_every == 0:
            self.board.picture(self.step, plan, self.cost)


def _apex_fused_adam() -> type | None:
    """NVIDIA apex's FusedAdam when apex is built (GPU clusters build it from source; PyPI's apex is unrelated)."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


def train(job: TrainJob) -> list[float]:
    return Trainer(job).run()
