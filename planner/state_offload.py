"""Optimizer-state offload, a per-run choice: whether the fp32 parameters, gradients and AdamW moments live in
host memory (FSDP2's ``CPUOffloadPolicy``, the update on the host CPUs) for this run.

``planner.state_offload``: ``off`` keeps them on the GPUs; ``on`` offloads them; ``auto`` (the default) offloads
only when the run's longest sequence (``data.max_len``, or the longest length ``sp-plan`` is given) does not
fit with the states on the GPUs under any memory mode the planner may use, and does fit without them. It is
decided once per run because FSDP2 fixes where the states live when it shards the model; its time (PCIe copies
per micro-step, the AdamW update on the host per step) is charged by :class:`~planner.cost.CostModel`.
"""

from __future__ import annotations

from dataclasses import replace

from planner.capacity import world_capacity
from planner.cost import CostModel
from planner.types import MemoryMode

STATE_OFFLOAD = ("auto", "on", "off")


def resolve(cost: CostModel, setting: str, max_len: int, modes: tuple[MemoryMode, ...]) -> CostModel:
    """``cost`` with its states where ``setting`` puts them for a run whose longest sequence is ``max_len``."""
    if setting not in STATE_OFFLOAD:
        raise ValueError(f"planner.state_offload={setting!r}; valid: {list(STATE_OFFLOAD)}")
    if setting == "on" and cost.sharding != "fsdp":
        raise ValueError(f"planner.state_offload=on needs train.sharding=fsdp (FSDP2's CPUOffloadPolicy), "
                         f"got {cost.sharding!r}; valid: planner.state_offload=auto or off")  # fmt: skip
    on = replace(cost, state_offload=True) if cost.sharding == "fsdp" else cost
    if setting != "auto":
        return on if setting == "on" else replace(cost, state_offload=False)
    return cost if holds(cost, max_len, modes) or not holds(on, max_len, modes) else on


def holds(cost: CostModel, length: int, modes: tuple[MemoryMode, ...]) -> bool:
    """Whether the whole cluster, as one group of any layout, holds a sequence of ``length`` under some mode of
    ``modes``."""
    return world_capacity(cost, modes) >= length
