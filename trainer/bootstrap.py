"""One bootstrap for every launcher: read rank / world / local rank / master address, init the process group.

Sources, first match wins:
- torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- Slurm (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, master = first host of
  ``SLURM_JOB_NODELIST`` (expanded with ``scontrol show hostnames``), port from ``MASTER_PORT`` or the job id;
- Open MPI: ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK``;
- MPICH / PMI: ``PMI_RANK``, ``PMI_SIZE`` (``MPI_LOCALRANKID`` for the local rank);
- for the MPI launchers the master address is broadcast from rank 0 with mpi4py when ``MASTER_ADDR`` is unset;
- nothing: a single process (rank 0 of 1).

The backend is NCCL when CUDA is available, gloo otherwise. Inconsistent values (rank >= world, world < 1)
raise a ValueError naming the variables.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as e:
        raise ValueError(f"launcher variable {key}={env[key]!r} is not an integer") from e


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        hosts = out.stdout.split() if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):  # no Slurm client here: expand the simple forms ourselves
        hosts = []
    if hosts:
        return hosts[0]
    head = nodelist.split(",")[0]
    if "[" in head:  # node[01-04] -> node01
        base, rng = head.split("[", 1)
        return base + rng.split("-")[0].split(",")[0].rstrip("]")
    return head


def _mpi_master(rank: int) -> str:
    from mpi4py import MPI

    addr = socket.gethostbyname(socket.gethostname()) if rank == 0 else None
    return MPI.COMM_WORLD.bcast(addr, root=0)


def read_env(env: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = int(env.get("LOCAL_RANK", "0"))
        addr, launcher = env.get("MASTER_ADDR", "127.0.0.1"), "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = int(env.get("SLURM_LOCALID", "0"))
        addr = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        launcher = "slurm"
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        addr = env.get("MASTER_ADDR") or _mpi_master(rank)
        launcher = "openmpi"
    elif "PMI_RANK" in env:
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = int(env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", "0")))
        addr = env.get("MASTER_ADDR") or (_mpi_master(rank) if world > 1 else "127.0.0.1")
        launcher = "mpich"
    else:
        rank, world, local, addr, launcher = 0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), "single"
        if "MASTER_PORT" not in env:
            port = free_loopback_port()  # two single-process runs must not fight over 29500
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"{launcher} environment is inconsistent: rank={rank}, world size={world}, local rank={local}")
    return DistEnv(rank, world, local, addr, port, launcher)


def free_loopback_port() -> int:
    """A port the kernel says is free on 127.0.0.1 (bound to loopback only, never all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Initialise torch.distributed from the launcher's environment (no-op if already initialised)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), 0, "", 0, "existing")
    de = read_env()
    kwargs: dict = {}
    if torch.cuda.is_available():
        # NCCL for CUDA tensors, gloo for any CPU tensor a library sends; device_id binds this rank's GPU
        # and creates the NCCL communicator eagerly (not in the middle of the first step)
        backend = "cpu:gloo,cuda:nccl"
        device = torch.device("cuda", de.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    else:
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{de.master_addr}:{de.master_port}",
        rank=de.rank,
        world_size=de.world,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    return de
