"""Everything one micro-step's attention needs on the device, built on the host once and uploaded in one copy.

A micro-step runs every layer's attention over the same packed layout, so the index tensors are the same for
every layer: the true position of each local token (RoPE), the Ulysses receive-buffer permutation, and, for
every ring step, the varlen packing a fused kernel is called with (``cu_seqlens`` of queries and keys, gather
indices where a step's rows are not one contiguous run). Uploading each of them per layer costs a pageable
``cudaMemcpyAsync`` plus a stream synchronisation, in forward, in the recompute and in backward: the host
then cannot run ahead of the GPU, which FSDP2's prefetching depends on. Here they are built once, from the
layout alone, into one host buffer (pinned on CUDA) and copied with one ``non_blocking`` upload; every layer
reads views of it. Tensors the model derives from them (RoPE cos/sin) are memoised here too
(:meth:`StepTables.memo`).

:class:`StepTables` is a plain class, not a dataclass, and hangs off :class:`sp.context.SPContext` (also a
plain class): FSDP2's forward-input cast (``_apply_to_tensors``) rebuilds every dataclass it meets with
``dataclasses.replace``, which would drop every cache at every FSDP unit.

:func:`upload` is the one host-to-device helper of the runtime; :data:`UPLOADS` counts its calls (the tests
check that the count per micro-step does not grow with the number of layers).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sp.context import SPContext


class UploadCounter:
    """Calls of :func:`upload` (and bytes), process-wide: a counter, not state anything depends on."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0


UPLOADS = UploadCounter()


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` on ``device``: on CUDA through pinned memory with a non-blocking copy (no host sync); the
    CPU tensor itself on the CPU. Every host-to-device copy the runtime makes per micro-step goes here."""
    UPLOADS.calls += 1
    UPLOADS.bytes += host.numel() * host.element_size()
    device = torch.device(device)
    if device.type == "cpu" or device.type == "meta":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class StepTables:
    """The device tables of one SP context (one micro-step of one group). Built on first use, then reused by
    every layer, its recompute and its backward."""

    def __init__(self, ctx: SPContext) -> None:
        self._ctx = ctx
        self._views: dict[Hashable, torch.Tensor] | None = None
        self._plans: dict[int, Any] = {}  # ring step source -> the kernel's packing of that step (host side)
        self._memo: dict[Hashable, Any] = {}
        self._valid: torch.Tensor | None = None
        self.builds = 0  # how often the index tables were built and uploaded (1 per context)

    def _build(self) -> dict[Hashable, torch.Tensor]:
        """Every index tensor of the micro-step, concatenated into one int64 host buffer, uploaded once."""
        from sp.kernels import get_kernel

        ctx = self._ctx
        index = ctx.layout.token_index(ctx.rank)  # packed row of each local token, -1 on padding
        host: dict[Hashable, torch.Tensor] = {"position_ids": ctx.layout.position_ids(ctx.rank), "valid": index >= 0}
        perm = ctx.layout.gather_perm
        if ctx.u > 1 and not torch.equal(perm, torch.arange(len(perm))):
            host["gather_perm"] = perm
        kernel: Any = get_kernel(ctx.kernel) if ctx.kernel != "ring_flash" else None
        for src in range(ctx.r) if hasattr(kernel, "pack_step") else ():
            plan = kernel.pack_step(self.pairs(src, kernel))  # a fused varlen kernel's packing of each ring step
            self._plans[src] = plan
            for name, t in plan.host_tensors().items():
                host[(src, name)] = t
        keys = list(host)
        sizes = [host[k].numel() for k in keys]
        flat = torch.cat([host[k].reshape(-1).to(torch.int64) for k in keys])  # [sum of sizes]
        dev = upload(flat, ctx.device)
        self.builds += 1
        views: dict[Hashable, torch.Tensor] = {}
        off = 0
        for k, n in zip(keys, sizes, strict=True):
            views[k] = dev[off : off + n]
            off += n
        for src, plan in self._plans.items():
            plan.attach({name: views[(src, name)] for name in plan.host_tensors()})
        return views

    def _get(self, key: Hashable) -> torch.Tensor | None:
        if self._views is None:
            self._views = self._build()
        return self._views.get(key)

    @property
    def position_ids(self) -> torch.Tensor:
        """True in-sequence position of each local token (for RoPE), on the context's device."""
        t = self._get("position_ids")
        assert t is not None
        return t

    @property
    def valid_rows(self) -> torch.Tensor:
        """Which local rows are tokens (bool, False on SP padding), on the context's device."""
        if self._valid is None:
            t = self._get("valid")
            assert t is not None
            self._valid = t.bool()  # (kept out of the memo: an index table, not a derived activation)
        return self._valid

    @property
    def gather_perm(self) -> torch.Tensor | None:
        """The Ulysses receive-buffer permutation on the device; None where it is the identity (one sequence,
        or u = 1): no index copy then."""
        return self._get("gather_perm")

    def step_plan(self, src: int) -> Any:
        """The kernel's packing of the ring step that meets ring rank ``src``'s K/V (device views attached)."""
        self._get("position_ids")
        return self._plans[src]

    def has_plans(self) -> bool:
        self._get("position_ids")
        return bool(self._plans)

    def pairs(self, src: int, kernel: Any) -> list[Any]:
        """The row pairs of the ring step that meets ring rank ``src``'s K/V (:func:`sp.ring.step_pairs`), once."""
        from sp.ring import step_pairs

        key = ("pairs", src, kernel.tile_rows)
        if key not in self._memo:
            self._memo[key] = step_pairs(self._ctx, src, kernel)
        return self._memo[key]  # type: ignore[no-any-return]

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per micro-step (e.g. RoPE cos/sin from :attr:`position_ids`), then the same object."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def derived(self) -> list[torch.Tensor]:
        """The memoised device tensors (RoPE cos/sin: ``2 d b`` per token, counted by the memory model); the
        int64 index tables (positions, permutation, varlen indices) are left out, as the model leaves them."""
        out: list[torch.Tensor] = []
        for v in self._memo.values():
            out.extend(x for x in (v if isinstance(v, tuple) else (v,)) if torch.is_tensor(x))
        return out
