"""``sp-bench checkpoint``: what checkpoint integrity costs in a save and a resume, before and after issue 22,
on gloo ranks of this machine.

The state: an FSDP2-sharded stack of linear layers with AdamW moments (fp32 parameters + 2 moments, about
``--gb`` GB in all), saved with torch DCP into a local folder. Schemes, each timed on the same state:

- ``rank0_sha256`` (before): the files written, rank 0 sha256-hashes every file of the checkpoint for the
  manifest, and on resume rank 0 alone re-hashes every file before the load;
- ``parallel_xxh3`` (after, :class:`trainer.checkpoint.Saver`): each rank hashes the files it wrote with
  xxh3-128, rank 0 merges; on resume every rank verifies its share (``newest_intact(collective=True)``);
- ``async_parallel_xxh3``: the same through DCP's async save; ``save_s`` is then what the step loop waits
  for (staging a host copy), ``total_s`` the whole background write.

Per row: ``state_bytes`` (all ranks), ``save_s`` (the blocking part), ``manifest_s`` (hashing + manifest),
``verify_s``, ``resume_s`` (verification + DCP load), and the integrity shares of save and resume. The files
are read back from the page cache (they were just written), as on a node whose checkpoint fits its memory;
a parallel file system adds its read bandwidth to both schemes' verification.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any


def _state(gb: float) -> tuple[Any, Any]:
    import torch
    from torch.distributed.fsdp import fully_shard

    width = 2048
    layers = max(1, round(gb * 1e9 / 3 / 4 / (width * width)))  # params + 2 AdamW moments, fp32
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optim.step()  # allocates the moments
    return model, optim


def _rank0_sha256_save(out: str, step: int, model: Any, optim: Any) -> dict[str, float]:
    """The scheme before issue 22 (trainer/checkpoint.py at 4f49d81): DCP write, then rank 0 hashes all."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainer import integrity

    folder = Path(out) / "checkpoints" / f"step_{step:06d}"
    t0 = time.perf_counter()
    if dist.get_rank() == 0:
        folder.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    dist.barrier()
    written = time.perf_counter()
    if dist.get_rank() == 0:
        body = {p.name: {"sha256": integrity.digest(p, "sha256"), "bytes": p.stat().st_size}
                for p in sorted(folder.iterdir())}  # fmt: skip
        (folder / integrity.MANIFEST).write_text(json.dumps(body))
    dist.barrier()
    done = time.perf_counter()
    return {"save_s": done - t0, "total_s": done - t0, "manifest_s": done - written}


def _resume(out: str, model: Any, optim: Any, scheme: str) -> dict[str, float]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from trainer import checkpoint, integrity

    t0 = time.perf_counter()
    if scheme == "rank0_sha256":
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            folder = checkpoint.candidates(out)[0]
            box[0] = (str(folder), integrity.verify(folder))
        dist.broadcast_object_list(box, src=0)
        path, problem = box[0]
    else:
        found, _ = checkpoint.newest_intact(out, collective=True)
        path, problem = str(found), None if found is not None else "no intact checkpoint"
    verified = time.perf_counter()
    assert problem is None, problem
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    dist.barrier()
    return {"verify_s": verified - t0, "resume_s": time.perf_counter() - t0}


def _rank(rank: int, world: int, workdir: str, gb: float, repeats: int) -> list[dict]:
    import torch.distributed as dist

    from trainer.checkpoint import Saver

    model, optim = _state(gb)
    local = sum(p.to_local().numel() * 4 * 3 for p in model.parameters())
    total = [0.0] * world
    dist.all_gather_object(total, local)
    rows = []
    savers = {"parallel_xxh3": Saver(f"{workdir}/parallel_xxh3"),
              "async_parallel_xxh3": Saver(f"{workdir}/async_parallel_xxh3", asynchronous=True)}  # fmt: skip
    for rep in range(repeats):
        for scheme in ("rank0_sha256", "parallel_xxh3", "async_parallel_xxh3"):  # interleaved
            out = f"{workdir}/{scheme}"
            if rank == 0:
                shutil.rmtree(out, ignore_errors=True)
            dist.barrier()
            if scheme == "rank0_sha256":
                t = _rank0_sha256_save(out, 1, model, optim)
            else:
                saver = savers[scheme]
                saver.save(1, model, optim, {"rep": rep})
                blocking = saver.last["blocking_s"]
                saver.wait()
                t = {**saver.last, "save_s": blocking}
            r = _resume(out, model, optim, scheme)
            rows.append({"bench": "checkpoint", "scheme": scheme, "repeat": rep, "world": world,
                         "state_bytes": int(sum(total)), "save_s": t["save_s"], "total_s": t["total_s"],
                         "manifest_s": t["manifest_s"], **r, "integrity_share_of_save": t["manifest_s"] / t["total_s"],
                         "integrity_share_of_resume": r["verify_s"] / r["resume_s"]})  # fmt: skip
    for s in savers.values():
        s.close()
    return rows if rank == 0 else []


def run(gb: float, world: int, workdir: str, repeats: int = 3) -> list[dict]:
    from sp.spawn import run_distributed

    os.makedirs(workdir, exist_ok=True)
    rows = run_distributed(_rank, world, workdir, gb, repeats, timeout=3600)[0]
    out = []
    for scheme in ("rank0_sha256", "parallel_xxh3", "async_parallel_xxh3"):
        mine = [r for r in rows if r["scheme"] == scheme]
        med = {k: sorted(r[k] for r in mine)[len(mine) // 2] for k in mine[0] if k.endswith(("_s", "_share_of_save",
               "_share_of_resume"))}  # fmt: skip
        out.append({"bench": "checkpoint", "scheme": scheme, "stat": f"median of {len(mine)}", "world": world,
                    "state_bytes": mine[0]["state_bytes"], **{k: round(v, 4) for k, v in med.items()}})  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)
    return rows + out
