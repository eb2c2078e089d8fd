"""Candidate group shapes: power-of-two sizes (aligned rank ranges) times the (u, r) splits the heads allow."""

from __future__ import annotations

from planner.types import GroupShape, ModelShape

STRATEGIES = ("none", "ulysses", "ring", "hybrid")


def candidate_shapes(model: ModelShape, world: int, strategies: tuple[str, ...] = STRATEGIES) -> list[GroupShape]:
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; valid: {list(STRATEGIES)}")
    shapes = []
    size = 1
    while size <= world:
        for u in model.ulysses_degrees(size):
            if size % u == 0:
                shape = GroupShape(u, size // u)
                if shape.strategy in strategies:
                    shapes.append(shape)
        size *= 2
    if not shapes:
        raise ValueError(f"no group shape of strategies {list(strategies)} fits a world of {world} GPUs")
    return shapes
