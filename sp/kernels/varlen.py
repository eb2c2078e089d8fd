"""Varlen packing shared by the fused CUDA kernels: a ring step's pairs as (at most) two varlen calls.

A fused varlen op (flash-attn, torch's aten flash op, cuDNN) takes packed queries and keys with
``cu_seqlens``: entry i attends rows ``cu_q[i]:cu_q[i+1]`` to keys ``cu_k[i]:cu_k[i+1]``, all causal or all
not. A ring step's pairs become entries through the kernel's call geometry (:meth:`VarlenKernel.calls`:
bottom-right causal alignment for flash, top-left for cuDNN), grouped by their causal flag. Entries whose rows
are consecutive in the local buffer are a slice of it (a view, no copy); otherwise a gather index.

:class:`VarlenStep` is the host-side packing of one ring step: the trainer's micro-step builds it once per
ring step (:class:`sp.step_tables.StepTables`) and uploads its index tensors with everything else in one
copy; called without one (a kernel test, a benchmark), the kernel packs and uploads on the fly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from sp.kernels.base import BlockPair, PairOut, lse_dtype

Call = tuple[int, int, int, int, bool]  # inside a pair: (first query row, end row, first key, end key, causal)


@dataclass
class Rows:
    """A selection of rows of a local buffer, packed in order: a plain slice when the runs are consecutive (a
    view: no copy, the common case of whole pairs), else a gather index (rows may repeat)."""

    span: slice | None
    host_index: torch.Tensor | None
    index: torch.Tensor | None = None  # host_index on the device, once attached

    @staticmethod
    def of(runs: list[tuple[int, int]]) -> Rows:
        if all(a + n == b for (a, n), (b, _) in zip(runs, runs[1:])):
            return Rows(slice(runs[0][0], runs[-1][0] + runs[-1][1]), None)
        return Rows(None, torch.cat([torch.arange(a, a + n) for a, n in runs]))

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The selected rows of ``x`` (dim 0)."""
        if self.span is not None:
            return x[self.span]
        assert self.index is not None, "gather index not on the device: attach the step first"
        return x.index_select(0, self.index)

    def add_into(self, acc: torch.Tensor, rows: torch.Tensor) -> None:
        """``acc[selected rows] += rows`` (repeated rows add up)."""
        if self.span is not None:
            acc[self.span] += rows.to(acc.dtype)
        else:
            assert self.index is not None
            acc.index_add_(0, self.index, rows.to(acc.dtype))

    def covers(self, n: int) -> bool:
        return self.span is not None and self.span.start == 0 and self.span.stop == n


@dataclass
class VarlenCall:
    """One varlen op call: its entries' rows, ``cu_seqlens`` and maximum lengths."""

    causal: bool
    entries: list[tuple[int, int, int, int]]  # (first q row, q rows, first k row, k rows) in the local buffers
    q: Rows
    k: Rows
    max_q: int
    max_k: int
    cu_q_host: torch.Tensor  # int64 [entries + 1]
    cu_k_host: torch.Tensor
    cu_q: torch.Tensor | None = None  # int32 on the device, once attached
    cu_k: torch.Tensor | None = None

    @staticmethod
    def of(causal: bool, entries: list[tuple[int, int, int, int]]) -> VarlenCall:
        cq = torch.tensor([0] + [n for _, n, _, _ in entries]).cumsum(0)
        ck = torch.tensor([0] + [n for _, _, _, n in entries]).cumsum(0)
        return VarlenCall(causal, entries, Rows.of([(a, n) for a, n, _, _ in entries]),
                          Rows.of([(a, n) for _, _, a, n in entries]), max(n for _, n, _, _ in entries),
                          max(n for _, _, _, n in entries), cq, ck)  # fmt: skip


@dataclass
class VarlenStep:
    """The packing of one ring step: one call per causal flag that has entries."""

    calls: list[VarlenCall] = field(default_factory=list)

    def host_tensors(self) -> dict[str, torch.Tensor]:
        """Every index tensor to upload, by name."""
        out: dict[str, torch.Tensor] = {}
        for i, c in enumerate(self.calls):
            out[f"{i}/cu_q"], out[f"{i}/cu_k"] = c.cu_q_host, c.cu_k_host
            if c.q.host_index is not None:
                out[f"{i}/q"] = c.q.host_index
            if c.k.host_index is not None:
                out[f"{i}/k"] = c.k.host_index
        return out

    def attach(self, views: dict[str, torch.Tensor]) -> None:
        """Take the uploaded device views (int64) of :meth:`host_tensors`."""
        for i, c in enumerate(self.calls):
            c.cu_q, c.cu_k = views[f"{i}/cu_q"].to(torch.int32), views[f"{i}/cu_k"].to(torch.int32)
            c.q.index, c.k.index = views.get(f"{i}/q"), views.get(f"{i}/k")

    def attach_to(self, device: torch.device) -> VarlenStep:
        """Upload on the fly (a call without a micro-step's tables)."""
        from sp.step_tables import upload

        host = self.host_tensors()
        names = list(host)
        flat = upload(torch.cat([host[n].reshape(-1) for n in names]), device)  # [sum of sizes]
        views, off = {}, 0
        for n in names:
            views[n] = flat[off : off + host[n].numel()]
            off += host[n].numel()
        self.attach(views)
        return self


class VarlenKernel(ABC):
    """A fused varlen kernel: subclasses give the call geometry and the two op calls; this class packs ring
    steps, routes rows and gradients, and implements the block-kernel protocol on top."""

    tile_rows: int | None = None  # memory linear in rows: pairs go whole, never tiled
    name = "varlen"
    half_only = True  # the CUDA ops take bf16/fp16 only (CPU stand-ins in the tests take any dtype)

    # -- what a subclass provides --------------------------------------------------------------------------
    @abstractmethod
    def calls(self, nq: int, nk: int, q_pos: int, k_pos: int, mask: bool) -> list[Call]:
        """A pair as the op's calls (its causal alignment: :func:`bottom_right_calls`, :func:`top_left_calls`)."""

    @abstractmethod
    def op_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: VarlenCall,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Packed ``[n, h, d]`` in -> (out ``[n, h, d]`` in the op's dtype, lse ``[h, n]`` fp32, -inf where a
        row sees no key)."""

    @abstractmethod
    def op_backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, call: VarlenCall,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Packed gradients from the final (out, lse ``[h, n]``)."""

    def check(self, q: torch.Tensor) -> None:
        if self.half_only and q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"kernel {self.name!r} takes bf16/fp16 tensors, got {q.dtype}; valid kernels for "
                             "fp32: 'torch' (reference) or 'cpu_fused' (CPU)")  # fmt: skip

    # -- packing -------------------------------------------------------------------------------------------
    def pack_step(self, pairs: list[BlockPair]) -> VarlenStep:
        """Host-side packing of a ring step's pairs (no device work)."""
        by_mask: dict[bool, list[tuple[int, int, int, int]]] = {True: [], False: []}
        for qs, nq, ks, nk, q_pos, k_pos, mask in pairs:
            for r0, r1, k0, k1, causal in self.calls(nq, nk, q_pos, k_pos, mask):
                by_mask[causal].append((qs + r0, r1 - r0, ks + k0, k1 - k0))
        return VarlenStep([VarlenCall.of(c, e) for c, e in by_mask.items() if e])

    def _step(self, pairs: list[BlockPair], step: VarlenStep | None, device: torch.device) -> VarlenStep:
        return step if step is not None else self.pack_step(pairs).attach_to(device)

    # -- the block-kernel protocol (batched) ---------------------------------------------------------------
    def forward_pairs(self, q, k, v, pairs: list[BlockPair], scale: float,
                      step: VarlenStep | None = None) -> list[PairOut]:  # fmt: skip
        """Every pair of a ring step in (at most) two op calls; one (rows, out, lse) per entry."""
        self.check(q)
        results: list[PairOut] = []
        for call in self._step(pairs, step, q.device).calls:
            o, l_ = self.op_forward(call.q.take(q), call.k.take(k), call.k.take(v), call, scale)
            off = 0
            for a, n, _, _ in call.entries:
                results.append((slice(a, a + n), o[off : off + n], l_[:, off : off + n]))
                off += n
        return results

    def backward_pairs(self, dout, q, k, v, out, lse, pairs: list[BlockPair], scale: float, dq, dk, dv,
                       step: VarlenStep | None = None) -> None:  # fmt: skip
        """Adds every pair's gradients of a ring step into dq (my rows) and dk/dv (the block's)."""
        for call in self._step(pairs, step, q.device).calls:
            g = self._call_backward(dout, q, k, v, out, lse, call, scale)
            call.q.add_into(dq, g[0])
            call.k.add_into(dk, g[1])
            call.k.add_into(dv, g[2])

    def backward_whole(self, dout, q, k, v, out, lse, pairs: list[BlockPair], scale: float,
                       step: VarlenStep | None = None) -> tuple[torch.Tensor, ...] | None:  # fmt: skip
        """The op's own gradients where one call covers every local row and key exactly once (no ring, one
        unpadded sequence or several whose rows and keys are in order): no accumulator, no copy. Else None."""
        st = self._step(pairs, step, q.device)
        if len(st.calls) != 1 or not (st.calls[0].q.covers(q.shape[0]) and st.calls[0].k.covers(k.shape[0])):
            return None
        return self._call_backward(dout, q, k, v, out, lse, st.calls[0], scale)

    def _call_backward(self, dout, q, k, v, out, lse, call: VarlenCall, scale: float):
        # lse [h, T] -transpose-> [T, h] -take rows-> [n, h] -transpose-> [h, n]
        row_lse = call.q.take(lse.T).T.to(lse_dtype(q.dtype)).contiguous()
        return self.op_backward(call.q.take(dout).contiguous(), call.q.take(q).contiguous(),
                                call.k.take(k).contiguous(), call.k.take(v).contiguous(),
                                call.q.take(out).to(q.dtype).contiguous(), row_lse, call, scale)  # fmt: skip

    # -- one pair (the protocol's unbatched entry points) ----------------------------------------------------
    def forward(self, q, k, v, q_pos, k_pos, mask, scale):
        from sp.merge import merge_into

        nq, h, d = q.shape
        out = torch.zeros(nq, h, d, dtype=torch.float32, device=q.device)
        lse = torch.full((h, nq), float("-inf"), dtype=torch.float32, device=q.device)
        fresh = torch.ones(nq, dtype=torch.bool)
        for rows, o, l_ in self.forward_pairs(q, k, v, [(0, nq, 0, k.shape[0], q_pos, k_pos, mask)], scale):
            if bool(fresh[rows].all()):
                out[rows], lse[:, rows] = o, l_
            else:
                merge_into(out[rows], lse[:, rows], o.float(), l_.float())
            fresh[rows] = False
        return out, lse

    def backward(self, dout, q, k, v, out, lse, q_pos, k_pos, mask, scale):
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        pairs: list[BlockPair] = [(0, q.shape[0], 0, k.shape[0], q_pos, k_pos, mask)]
        self.backward_pairs(dout, q, k, v, out, lse, pairs, scale, dq, dk, dv)
        return dq, dk, dv


def bottom_right_calls(nq: int, nk: int, q_pos: int, k_pos: int, mask: bool) -> list[Call]:
    """A pair as calls of a kernel whose causal mask is aligned bottom-right (flash-attn >= 2.1 and torch's
    flash op: row t of nq sees key j <= t + nk - nq); ours is by true position (row i sees key j <= i + q_pos
    - k_pos). With ``off = q_pos - k_pos`` the rows split in three: rows ``i < -off`` see no key (no call:
    out 0, lse -inf); rows ``[e, f)`` are causal, called with keys cut to ``f + off`` so that bottom-right
    alignment equals ours (``f = nk - off``); rows ``i >= nk - off`` see every key (one unmasked call). A
    diagonal pair (``nq == nk``, ``off == 0``) is one causal call."""
    if not mask:
        return [(0, nq, 0, nk, False)]
    off = q_pos - k_pos
    e = min(nq, max(0, -off))
    f = min(nq, max(e, nk - off))  # the causal call's keys f + off <= nk: a diagonal tile is one call
    calls: list[Call] = []
    if f > e:
        calls.append((e, f, 0, f + off, True))
    if nq > f:
        calls.append((f, nq, 0, nk, False))
    return calls


def top_left_calls(nq: int, nk: int, q_pos: int, k_pos: int, mask: bool) -> list[Call]:
    """A pair as calls of a kernel whose causal mask is aligned top-left (query row i of a call sees key
    j <= i of the call: torch's CPU flash op, cuDNN): at most one unmasked call (keys before the queries'
    start) and one causal call whose first key has the first query's position; rows before the first key
    see nothing (out 0, lse -inf)."""
    if not mask:
        return [(0, nq, 0, nk, False)]
    off = q_pos - k_pos  # keys [0, off) precede every query: visible to all rows
    if off >= 0:
        calls: list[Call] = [(0, nq, 0, min(off, nk), False)] if off > 0 else []
        if off < nk:  # keys from the first query's position on: causal, aligned at its start
            calls.append((0, nq, off, min(nk, off + nq), True))
        return calls
    first = -off  # rows before the first key see nothing
    if first >= nq:
        return []
    return [(first, nq, 0, min(nk, nq - first), True)]
