"""Candidate group shapes: the topology's group sizes (planner.topology) times the (u, r) splits the heads allow."""

from __future__ import annotations

from planner.topology import Topology
from planner.types import GroupShape, ModelShape

STRATEGIES = ("none", "ulysses", "ring", "hybrid")


def candidate_shapes(
    model: ModelShape, topology: Topology, strategies: tuple[str, ...] = STRATEGIES
) -> list[GroupShape]:
    """Every (u, r) with u x r a group size of ``topology``, u a degree the heads allow and the topology
    places (a group spanning nodes keeps its Ulysses sub-groups inside nodes), r any ring degree (zigzag over
    2r chunks), of the strategies listed."""
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; valid: {list(STRATEGIES)}")
    shapes = [
        GroupShape(u, size // u)
        for size in topology.sizes
        for u in model.ulysses_degrees(size)
        if topology.ulysses_ok(size, u)
    ]
    shapes = [s for s in shapes if s.strategy in strategies]
    if not shapes:
        raise ValueError(f"no group shape of strategies {list(strategies)} fits {topology.describe()}")
    return shapes
