"""Pure layout of a packed variable-length batch over one SP group of P = u x r ranks.

No process groups here: every function is arithmetic on ``cu_seqlens`` and can be unit-tested alone.

Group rank ``g = i * u + j`` has ring index ``i`` (0..r-1) and Ulysses index ``j`` (0..u-1): the u ranks of
one Ulysses sub-group are contiguous, the r ranks of one ring are strided by u (USP's 2D layout).

Each sequence of length L is padded to ``Lp``, a multiple of ``c * u`` with ``c = 2r`` chunks when r > 1
(zigzag) and ``c = 1`` otherwise. Ring rank i owns chunks i and 2r-1-i (its *ring share*, ``R = Lp * 2 / c``
tokens, or ``Lp`` when r == 1), so every ring rank does the same causal work. Ulysses rank j of ring rank i
holds the contiguous slice j of that ring share (``R / u`` tokens). Padding sits at the end of each sequence
(positions >= L): the kernels cut keys at L, so padding never reaches a real token's softmax, and ``unshard``
drops padded rows, so it never reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Segment:
    """A run of ``length`` consecutive tokens of sequence ``seq`` starting at position ``pos``,
    stored at rows ``[start, start + length)`` of a ring-local buffer."""

    seq: int
    start: int
    length: int
    pos: int


def _as_lengths(cu_seqlens: torch.Tensor | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least one sequence, got {cu[:8]}")
    lengths = tuple(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    bad = [n for n in lengths if n <= 0]
    if bad:
        raise ValueError(f"cu_seqlens must be strictly increasing (every length >= 1), got lengths {bad[:8]}")
    return lengths


@dataclass(frozen=True)
class GroupLayout:
    """Where every token of a packed batch lives inside a group of ``u * r`` ranks."""

    seqlens: tuple[int, ...]
    u: int = 1
    r: int = 1

    @staticmethod
    def build(cu_seqlens: torch.Tensor | list[int] | tuple[int, ...], u: int = 1, r: int = 1) -> GroupLayout:
        if u < 1 or r < 1:
            raise ValueError(f"SP degrees must be >= 1, got u={u}, r={r}")
        return GroupLayout(_as_lengths(cu_seqlens), u, r)

    @property
    def size(self) -> int:
        return self.u * self.r

    @property
    def chunks(self) -> int:
        return 2 * self.r if self.r > 1 else 1

    @cached_property
    def padded(self) -> tuple[int, ...]:
        q = self.chunks * self.u
        return tuple(-(-n // q) * q for n in self.seqlens)

    @cached_property
    def cu_seqlens(self) -> tuple[int, ...]:
        cu = [0]
        for n in self.seqlens:
            cu.append(cu[-1] + n)
        return tuple(cu)

    @property
    def total_tokens(self) -> int:
        return self.cu_seqlens[-1]

    def ring_share(self, s: int) -> int:
        """Tokens of sequence ``s`` held by one ring rank (before the Ulysses split)."""
        return self.padded[s] * (2 if self.r > 1 else 1) // self.chunks

    @cached_property
    def local_seqlens(self) -> tuple[int, ...]:
        """Tokens of each sequence on every rank (the same on all ranks of the group, padding included)."""
        return tuple(self.ring_share(s) // self.u for s in range(len(self.seqlens)))

    @property
    def local_tokens(self) -> int:
        return sum(self.local_seqlens)

    @cached_property
    def local_cu_seqlens(self) -> torch.Tensor:
        cu = [0]
        for n in self.local_seqlens:
            cu.append(cu[-1] + n)
        return torch.tensor(cu, dtype=torch.int64)

    def ring_segments(self, ring_rank: int) -> tuple[Segment, ...]:
        """Segments of the ring-local buffer (all u slices gathered) of ring rank ``ring_rank``."""
        if not 0 <= ring_rank < self.r:
            raise ValueError(f"ring_rank must be in [0, {self.r}), got {ring_rank}")
        segs: list[Segment] = []
        start = 0
        for s, lp in enumerate(self.padded):
            if self.r == 1:
                segs.append(Segment(s, start, lp, 0))
                start += lp
                continue
            c = lp // self.chunks
            for chunk in (ring_rank, 2 * self.r - 1 - ring_rank):
                segs.append(Segment(s, start, c, chunk * c))
                start += c
        return tuple(segs)

    def ring_positions(self, ring_rank: int) -> torch.Tensor:
        """Position inside its sequence of every row of ring rank ``ring_rank``'s ring-local buffer."""
        parts = [torch.arange(g.pos, g.pos + g.length) for g in self.ring_segments(ring_rank)]
        return torch.cat(parts)

    def position_ids(self, rank: int) -> torch.Tensor:
        """True in-sequence position of each local token of group rank ``rank`` (padding: >= its length)."""
        i, j = divmod(self._check_rank(rank), self.u)
        ring_pos = self.ring_positions(i)
        parts = []
        off = 0
        for s in range(len(self.seqlens)):
            share, n = self.ring_share(s), self.local_seqlens[s]
            parts.append(ring_pos[off + j * n : off + (j + 1) * n])
            off += share
        return torch.cat(parts)

    def token_index(self, rank: int) -> torch.Tensor:
        """Global packed row of each local token of group rank ``rank``; -1 marks padding."""
        pos = self.position_ids(rank)
        seq = torch.repeat_interleave(torch.arange(len(self.seqlens)), torch.tensor(self.local_seqlens))
        lens = torch.tensor(self.seqlens)[seq]
        start = torch.tensor(self.cu_seqlens[:-1])[seq]
        return torch.where(pos < lens, start + pos, torch.full_like(pos, -1))

    @cached_property
    def gather_perm(self) -> torch.Tensor:
        """Rows of the Ulysses receive buffer ``[u (source j), local_tokens]`` flattened, in ring-local order.

        Ring-local row ``off_s + j * n_s + k`` (sequence s, source j, offset k) comes from received row
        ``j * local_tokens + loff_s + k``.
        """
        n_local = self.local_tokens
        parts = []
        loff = 0
        for n in self.local_seqlens:
            for j in range(self.u):
                base = j * n_local + loff
                parts.append(torch.arange(base, base + n))
            loff += n
        return torch.cat(parts)

    def _check_rank(self, rank: int) -> int:
        if not 0 <= rank < self.size:
            raise ValueError(f"group rank must be in [0, {self.size}), got {rank}")
        return rank


def shard(x: torch.Tensor, layout: GroupLayout, rank: int) -> torch.Tensor:
    """Rows of the packed global tensor ``x`` (``[total_tokens, ...]``) that group rank ``rank`` holds;
    padded rows are zero."""
    if x.shape[0] != layout.total_tokens:
        raise ValueError(f"x has {x.shape[0]} rows but cu_seqlens covers {layout.total_tokens} tokens")
    idx = layout.token_index(rank)
    pad = torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    # [T + 1, ...]: the extra zero row stands in for every padded slot (index -1)
    return torch.cat([x, pad])[idx.to(x.device)]


def unshard(parts: list[torch.Tensor], layout: GroupLayout) -> torch.Tensor:
    """Inverse of :func:`shard`: ``parts[g]`` is group rank g's local tensor; returns ``[total_tokens, ...]``."""
    if len(parts) != layout.size:
        raise ValueError(f"need one part per group rank ({layout.size}), got {len(parts)}")
    ref = parts[0]
    out = ref.new_zeros((layout.total_tokens, *ref.shape[1:]))
    for g, part in enumerate(parts):
        idx = layout.token_index(g).to(ref.device)
        keep = idx >= 0
        out[idx[keep]] = part[keep]
    return out
