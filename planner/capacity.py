"""What a sequence too long for the cluster would need: the longest sequence each memory-technique set holds on
this many GPUs, and the settings or GPU count that would hold the requested one."""

from __future__ import annotations

from dataclasses import replace

from planner.cost import CostModel
from planner.topology import Topology
from planner.types import GroupShape, MemoryMode

CHUNK, TILE = 2048, 8192  # the defaults of configs/planner/default.yaml


def technique_sets(cost: CostModel) -> list[tuple[str, str, MemoryMode]]:
    """(label, the planner settings that enable it, mode), from the model's own settings to every technique."""
    own = MemoryMode.of(cost.model)
    offload = replace(own, checkpointing="offload")
    chunk = replace(offload, loss_chunk_tokens=own.loss_chunk_tokens or CHUNK)
    tiled = replace(chunk, tile_tokens=own.tile_tokens or TILE)
    return [
        (f"the model's own settings ({own.label})", "", own),
        ("offload", "planner.checkpointing=[offload]", offload),
        (f"offload + loss chunk {chunk.loss_chunk_tokens}",
         f"planner.checkpointing=[offload] planner.loss_chunk_tokens=[{chunk.loss_chunk_tokens}]", chunk),
        (f"offload + loss chunk + tile {tiled.tile_tokens}",
         f"planner.checkpointing=[offload] planner.loss_chunk_tokens=[{chunk.loss_chunk_tokens}] "
         f"planner.tile_tokens=[{tiled.tile_tokens}]", tiled),
    ]  # fmt: skip


def world_shapes(cost: CostModel) -> list[GroupShape]:
    """Every layout of one group of all the cluster's GPUs: the Ulysses degrees the heads and the nodes allow."""
    n = cost.cluster.world
    topo = Topology(cost.cluster.nodes, cost.cluster.gpus_per_node)
    return [GroupShape(u, n // u) for u in cost.model.ulysses_degrees(n) if topo.ulysses_ok(n, u)]


def world_capacity(cost: CostModel, modes: tuple[MemoryMode, ...] = ()) -> float:
    """Tokens of one sequence the whole cluster holds as one group, in its roomiest layout and the roomiest of
    ``modes`` (default: the model's own)."""
    n = cost.cluster.world
    return max(cost.with_mode(m).tokens_capacity(n, s)
               for m in (modes or (MemoryMode.of(cost.model),)) for s in world_shapes(cost))  # fmt: skip


def longest(cost: CostModel, mode: MemoryMode, shapes: list[GroupShape]) -> int:
    """The longest single sequence ``cost`` under ``mode`` holds on its cluster (the largest group shape)."""
    c = cost.with_mode(mode)
    return int(max(c.tokens_capacity(s.size, s) for s in shapes))


def refusal(length: int, cost: CostModel, shapes: list[GroupShape], allowed: tuple[MemoryMode, ...]) -> str:
    """The error for a sequence no plan can hold: what each technique set holds here (and which the planner's
    settings allow), and the smallest node count the richest set would need."""
    cl = cost.cluster
    rows = []
    for label, setting, mode in technique_sets(cost):
        held = longest(cost, mode, shapes)
        note = "" if mode in allowed or not setting else f" [{setting}]"
        rows.append(f"{held:,} with {label}{note}")
    richest = technique_sets(cost)[-1][2]
    if not cost.state_offload and cost.sharding == "fsdp":
        held = longest(replace(cost, state_offload=True), richest, shapes)
        rows.append(f"{held:,} with every technique and the optimizer states in host memory "
                    "[planner.state_offload=on or auto]")  # fmt: skip
        cost = replace(cost, state_offload=True)
    need = ""
    for factor in (2, 4, 8, 16, 32, 64):
        bigger = replace(cost, cluster=replace(cl, nodes=cl.nodes * factor))
        size = bigger.cluster.world
        if world_capacity(bigger, (richest,)) >= length:
            need = f"; {cl.nodes * factor} nodes ({size} GPUs) hold it with every technique"
            break
    return (f"sequence of length {length:,} exceeds what the cluster can hold in one SP group: on {cl.world} GPUs of "
            f"{cl.memory_gib} GiB the longest sequence is {'; '.join(rows)}{need}; or shorten max_len")  # fmt: skip
