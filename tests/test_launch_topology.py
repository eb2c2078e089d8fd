"""The planner's topology comes from the launch: faked torchrun, Slurm and MPI environments, host names, and
the refusal of a profile that contradicts the launch."""

from __future__ import annotations

import pytest

from planner.types import Cluster
from trainer.launch_topology import describe, from_hosts, launch_cluster, read_launch

H100 = Cluster(name="h100x64", nodes=8, gpus_per_node=8, intra_gbs=300.0, inter_gbs=40.0, memory_gib=76.0)


@pytest.mark.parametrize(
    ("env", "world", "nodes", "per_node"),
    [
        ({"LOCAL_WORLD_SIZE": "8"}, 16, 2, 8),  # torchrun --nnodes 2 --nproc_per_node 8
        ({"LOCAL_WORLD_SIZE": "3"}, 3, 1, 3),  # torchrun --nproc_per_node 3
        ({"LOCAL_WORLD_SIZE": "6"}, 6, 1, 6),
        ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "3"}, 24, 3, 8),  # sbatch --nodes=3 --ntasks-per-node=8
        ({"SLURM_TASKS_PER_NODE": "8(x3)", "SLURM_NNODES": "3"}, 24, 3, 8),
        ({"SLURM_TASKS_PER_NODE": "4,4"}, 8, 2, 4),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 12, 3, 4),  # mpirun -npernode 4
        ({"MPI_LOCALNRANKS": "2"}, 4, 2, 2),  # MPICH / Intel MPI (Hydra)
    ],
)
def test_launchers_say_nodes_and_ranks_per_node(env, world, nodes, per_node):
    top = read_launch(env, world)
    assert top is not None and (top.nodes, top.per_node) == (nodes, per_node)


def test_no_launcher_variables_means_host_names():
    assert read_launch({"RANK": "0", "WORLD_SIZE": "4"}, 4) is None
    top = from_hosts(["a", "a", "a", "b", "b", "b"])
    assert (top.nodes, top.per_node) == (2, 3)
    with pytest.raises(ValueError, match="not in equal blocks per node.*a x1, b x1, a x1"):
        from_hosts(["a", "b", "a", "b"])  # a cyclic distribution: ranks of a node are not contiguous
    with pytest.raises(ValueError, match="not in equal blocks per node.*a x3, b x1"):
        from_hosts(["a", "a", "a", "b"])


@pytest.mark.parametrize(
    ("env", "world", "match"),
    [
        ({"LOCAL_WORLD_SIZE": "4"}, 6, "6 ranks are not whole nodes of 4"),
        ({"SLURM_TASKS_PER_NODE": "8,8,4"}, 20, "uneven ranks per node \\(\\[8, 8, 4\\]\\)"),
        ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2"}, 24, "SLURM_NNODES=2 but 24 ranks"),
        ({"LOCAL_WORLD_SIZE": "x"}, 4, "LOCAL_WORLD_SIZE='x' is not an integer"),
        ({"SLURM_TASKS_PER_NODE": "8(y2)"}, 16, "valid: e.g. '8', '8\\(x3\\)'"),
    ],
)
def test_inconsistent_launches_are_refused(env, world, match):
    with pytest.raises(ValueError, match=match):
        read_launch(env, world)


def test_profile_takes_the_launched_nodes_and_keeps_its_links():
    """sbatch --nodes=2 with cluster=h100x64 plans 2 nodes of 8 (links between them at inter_gbs), not 16 GPUs
    inside one node."""
    top = read_launch({"SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2"}, 16)
    assert top is not None
    cl = launch_cluster(H100, top)
    assert (cl.nodes, cl.gpus_per_node, cl.inter_gbs, cl.intra_gbs) == (2, 8, 40.0, 300.0)
    assert "2 node(s) x 8 GPUs = 16" in describe(H100, cl, top) and "SLURM_NTASKS_PER_NODE=8" in describe(H100, cl, top)
    part = launch_cluster(H100, read_launch({"LOCAL_WORLD_SIZE": "3"}, 3))  # 3 ranks on one 8-GPU node
    assert (part.nodes, part.gpus_per_node) == (1, 3)


@pytest.mark.parametrize(
    ("env", "world"), [({"LOCAL_WORLD_SIZE": "4"}, 8), ({"LOCAL_WORLD_SIZE": "16"}, 16), ({"MPI_LOCALNRANKS": "6"}, 12)]
)
def test_a_profile_that_contradicts_the_launch_is_refused(env, world):
    top = read_launch(env, world)
    assert top is not None
    with pytest.raises(
        ValueError, match=f"has 8 GPUs per node, but the launch runs {top.per_node} ranks per node"
    ) as e:
        launch_cluster(H100, top)
    assert f"cluster.gpus_per_node={top.per_node}" in str(e.value)
    fixed = launch_cluster(Cluster(**{**H100.__dict__, "gpus_per_node": top.per_node}), top)
    assert fixed.world == world
