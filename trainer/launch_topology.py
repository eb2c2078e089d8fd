"""The cluster the planner plans for comes from the launch: nodes and ranks per node, never a guess.

Where the launcher says (first match wins):
- torchrun: ``LOCAL_WORLD_SIZE`` (ranks on this node);
- Slurm: ``SLURM_NTASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` (``8(x3)``, ``8,8,4``), with ``SLURM_NNODES``;
- Open MPI: ``OMPI_COMM_WORLD_LOCAL_SIZE``; MPICH / Intel MPI (Hydra): ``MPI_LOCALNRANKS``.
Where none does (a script that initialised torch.distributed itself), the ranks' host names are gathered and
counted. Ranks must come in equal blocks per node (rank = node x ranks per node + local rank: torchrun's and
Slurm's block distribution), which the host names check when gathered.

The cluster profile keeps its per-GPU and per-link figures; its node count is replaced by the launch's. A
profile whose GPUs per node contradict the launch is refused (a launch over several nodes with another count
of ranks per node, or more ranks on a node than the profile's node has GPUs): set ``cluster.gpus_per_node`` to
what the nodes have. One node running fewer ranks than the profile's node has GPUs is a part of a node, used
as launched and said so.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace

from planner.types import Cluster


@dataclass(frozen=True)
class LaunchTopology:
    nodes: int
    per_node: int  # ranks per node
    source: str  # what said so, e.g. "torchrun LOCAL_WORLD_SIZE=4"

    @property
    def world(self) -> int:
        return self.nodes * self.per_node


def read_launch(env: Mapping[str, str], world: int) -> LaunchTopology | None:
    """Nodes and ranks per node from the launcher's variables; None when no launcher says."""
    for key, name in (("LOCAL_WORLD_SIZE", "torchrun"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "Open MPI"),
                      ("MPI_LOCALNRANKS", "MPICH")):  # fmt: skip
        if key in env:
            return _even(world, _count(env, key), f"{name} {key}={env[key]}")
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if key in env:
            counts = _slurm_counts(env[key])
            if len(set(counts)) > 1:
                raise ValueError(f"Slurm {key}={env[key]}: uneven ranks per node ({counts}); the planner needs the "
                                 "same number on every node (sbatch --ntasks-per-node=N)")  # fmt: skip
            top = _even(world, counts[0], f"Slurm {key}={env[key]}")
            if "SLURM_NNODES" in env and _count(env, "SLURM_NNODES") != top.nodes:
                raise ValueError(f"Slurm SLURM_NNODES={env['SLURM_NNODES']} but {world} ranks at {counts[0]} per "
                                 f"node ({key}={env[key]}) make {top.nodes} nodes")  # fmt: skip
            return top
    return None


def from_hosts(hosts: list[str]) -> LaunchTopology:
    """Nodes and ranks per node from each rank's host name (rank order); equal contiguous blocks required."""
    blocks: list[tuple[str, int]] = []
    for h in hosts:
        if blocks and blocks[-1][0] == h:
            blocks[-1] = (h, blocks[-1][1] + 1)
        else:
            blocks.append((h, 1))
    names = [b[0] for b in blocks]
    if len(set(names)) != len(names) or len({b[1] for b in blocks}) != 1:
        raise ValueError(
            f"ranks are not in equal blocks per node (hosts in rank order: {_runs(blocks)}); the planner's groups "
            "are contiguous rank ranges inside nodes: launch with a block distribution and the same number of "
            "ranks on every node"
        )
    return LaunchTopology(len(blocks), blocks[0][1], f"host names ({len(blocks)} host(s))")


def gathered_hosts() -> list[str]:
    """Every rank's host name, in rank order (collective)."""
    import torch.distributed as dist

    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts


def launch_cluster(profile: Cluster, launch: LaunchTopology) -> Cluster:
    """The profile on the launched nodes, or a ValueError naming both where they contradict."""
    g = profile.gpus_per_node
    if launch.per_node > g or (launch.nodes > 1 and launch.per_node != g):
        raise ValueError(
            f"cluster profile {profile.name!r} has {g} GPUs per node, but the launch runs {launch.per_node} ranks "
            f"per node on {launch.nodes} node(s) ({launch.source}); launch {g} ranks per node, or set "
            f"cluster.gpus_per_node={launch.per_node} if these nodes have {launch.per_node} GPUs"
        )
    return replace(profile, nodes=launch.nodes, gpus_per_node=launch.per_node)


def describe(profile: Cluster, cluster: Cluster, launch: LaunchTopology) -> str:
    part = (f" (a part of one node: the profile's node has {profile.gpus_per_node} GPUs)"
            if cluster.gpus_per_node < profile.gpus_per_node else "")  # fmt: skip
    return (f"topology: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs = {cluster.world} from "
            f"{launch.source}{part}; links and speeds from cluster profile {profile.name!r}")  # fmt: skip


def _count(env: Mapping[str, str], key: str) -> int:
    try:
        n = int(env[key])
    except ValueError as e:
        raise ValueError(f"launcher variable {key}={env[key]!r} is not an integer") from e
    if n < 1:
        raise ValueError(f"launcher variable {key}={n}; valid: >= 1")
    return n


def _even(world: int, per_node: int, source: str) -> LaunchTopology:
    if world % per_node:
        raise ValueError(f"{source}: {world} ranks are not whole nodes of {per_node}; the planner needs the same "
                         "number of ranks on every node")  # fmt: skip
    return LaunchTopology(world // per_node, per_node, source)


def _slurm_counts(value: str) -> list[int]:
    """``8(x3),4`` -> [8, 8, 8, 4]."""
    out: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"Slurm tasks per node {value!r}; valid: e.g. '8', '8(x3)', '8,8,4'")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _runs(blocks: list[tuple[str, int]]) -> str:
    return ", ".join(f"{h} x{n}" for h, n in blocks[:8]) + (" ..." if len(blocks) > 8 else "")
