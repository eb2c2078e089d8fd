"""Where SP groups may sit: group sizes, node patterns and rank placement on ``nodes x gpus_per_node`` GPUs.

A group is a contiguous range of ranks (rank = node x G + local GPU, G = GPUs per node). A group of at most G
GPUs stays inside one node, on NVLink; a larger one spans whole nodes, so its size is a multiple of G and it
starts at a node's first rank (its Ulysses sub-groups, of a degree dividing G, stay inside nodes). Group sizes
(:meth:`Topology.sizes`): every size up to G and every multiple of G up to 16 nodes (then 2^j and 3 x 2^j nodes,
and the whole world, so the candidates grow with the log of a large cluster), or only the powers of two among
them (``planner.group_sizes=powers_of_two``, the layouts most SP systems allow).

Which multisets of sizes fit is a bin packing: the groups spanning nodes take whole nodes, the others are
packed into the remaining nodes of G GPUs. :meth:`Topology.patterns` lists the maximal fillings of one node;
the planner's MILPs choose how many nodes use each (a configuration model, exact), and :meth:`Topology.place`
places a multiset (first fit decreasing; where that fails, the pattern model decides exactly). When the sizes
up to G form a divisibility chain (1, 2, 4, 8 on 8-GPU nodes) the GPU count alone decides, and no pattern is
needed.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GROUP_SIZES = ("any", "powers_of_two")
MAX_PATTERNS = 4000  # past this many node fillings, sizes up to a node are restricted to a divisibility chain
EVERY_NODES = 16  # groups of every number of whole nodes up to this; beyond, 2^k and 1.5 x 2^k nodes (and all)


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int
    group_sizes: str = "any"

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"topology of {self.nodes} nodes x {self.gpus_per_node} GPUs; valid: both >= 1")
        if self.group_sizes not in GROUP_SIZES:
            raise ValueError(f"planner.group_sizes={self.group_sizes!r}; valid: {list(GROUP_SIZES)}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def __str__(self) -> str:
        return f"{self.nodes} node(s) x {self.gpus_per_node} GPUs"

    # ---- sizes ----
    @functools.cached_property
    def small(self) -> tuple[int, ...]:
        """Group sizes inside one node."""
        g = self.gpus_per_node
        if self.group_sizes == "powers_of_two":
            return tuple(s for s in _powers_of_two(g))
        every = tuple(range(1, g + 1))
        if len(_partitions(g, every)) <= MAX_PATTERNS:
            return every
        return _node_chain(g)

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        """Every group size a plan may use, ascending."""
        g = self.gpus_per_node
        big = [k * g for k in range(2, self.nodes + 1) if _node_count_kept(k) or k == self.nodes]
        if self.group_sizes == "powers_of_two":
            big = [s for s in big if s & (s - 1) == 0]
        return (*self.small, *big)

    @functools.cached_property
    def chain_sizes(self) -> tuple[int, ...]:
        """The sizes of the planner's fast plans: the powers of two dividing G, G, power-of-two numbers of whole
        nodes and the whole world. They never fragment a node (any multiset whose GPUs fit, fits) and are few;
        the MILP refinement then uses every size."""
        g, small = self.gpus_per_node, _node_chain(self.gpus_per_node)
        return tuple(s for s in self.sizes if s in small or (s > g and (s // g) & (s // g - 1) == 0) or s == self.world)

    def ulysses_ok(self, size: int, u: int) -> bool:
        """Whether a group of ``size`` may run Ulysses degree ``u``: u divides it and, for a group spanning
        nodes, divides G or is a multiple of it (each Ulysses sub-group of u consecutive ranks inside one node,
        or on whole nodes)."""
        g = self.gpus_per_node
        return size % u == 0 and (size <= g or g % u == 0 or u % g == 0)

    def max_groups(self, size: int) -> int:
        """How many groups of ``size`` fit at once."""
        g = self.gpus_per_node
        return self.nodes * (g // size) if size <= g else self.nodes // (size // g)

    # ---- packing ----
    @functools.cached_property
    def chain(self) -> bool:
        """Whether the sizes up to a node divide one another and G (then any multiset whose GPUs fit, fits)."""
        s = self.small
        return all(b % a == 0 for a, b in zip(s, s[1:])) and self.gpus_per_node % s[-1] == 0

    @functools.cached_property
    def patterns(self) -> np.ndarray:
        """[P, len(small)] the maximal fillings of one node: counts of groups of each size up to G."""
        return np.array(_partitions(self.gpus_per_node, self.small), dtype=np.int64).reshape(-1, len(self.small))

    def node_rows(self, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The placement constraints of the planner's MILPs over group columns of ``sizes`` [K], with pattern
        columns y [P] appended: rows ``A [R, K] n + B [R, P] y <= hi [R]`` (None when the GPU count alone
        decides). Row s < len(small): groups of the s-th small size <= those the patterns hold; last row:
        nodes of the patterns plus whole nodes of the spanning groups <= nodes."""
        if self.chain:
            return None
        g, small = self.gpus_per_node, list(self.small)
        k_n, p_n = len(sizes), len(self.patterns)
        a = np.zeros((len(small) + 1, k_n))
        b = np.zeros((len(small) + 1, p_n))
        for k, s in enumerate(sizes.tolist()):
            if s <= g:
                a[small.index(int(s)), k] = 1.0
            else:
                a[-1, k] = s // g
        b[: len(small)] = -self.patterns.T  # [len(small), P]
        b[-1] = 1.0
        hi = np.zeros(len(small) + 1)
        hi[-1] = self.nodes
        return a, b, hi

    def fits(self, sizes: Sequence[int]) -> bool:
        return _place_sorted(self, _descending(sizes)) is not None

    def place(self, sizes: Sequence[int]) -> list[int] | None:
        """First rank of each group (in the order given), or None when the multiset does not fit."""
        key = _descending(sizes)
        firsts = _place_sorted(self, key)
        if firsts is None:
            return None
        free: dict[int, list[int]] = {}
        for s, f in zip(key, firsts):
            free.setdefault(s, []).append(f)
        return [free[int(s)].pop(0) for s in sizes]

    @functools.cache  # noqa: B019 - a frozen dataclass, few instances
    def lists_per_rank(self) -> int:
        """The most process groups (rank lists of two or more) one rank can belong to across every placement of
        every group size and Ulysses degree: SP groups, Ulysses sub-groups, ring sub-groups."""
        g = self.gpus_per_node
        lists: set[tuple[int, ...]] = set()
        for size in self.sizes:
            starts = (
                [n * g + o for n in range(self.nodes) for o in range(g - size + 1)]
                if size <= g
                else [n * g for n in range(self.nodes - size // g + 1)]
            )
            for first in starts:
                ranks = tuple(range(first, first + size))
                for u in (u for u in range(1, size + 1) if self.ulysses_ok(size, u)):
                    for r in (ranks, *_sub(ranks, u)):
                        if len(r) > 1:
                            lists.add(r)
        held = Counter(rank for r in lists for rank in r)
        return max(held.values(), default=0)

    def free_per_node(self, sizes: Sequence[int]) -> list[int] | None:
        """GPUs left free in each node once groups of ``sizes`` are placed (None when they do not fit)."""
        firsts = self.place(sizes)
        if firsts is None:
            return None
        free = [self.gpus_per_node] * self.nodes
        for s, f in zip(sizes, firsts):
            for node in range(f // self.gpus_per_node, (f + s - 1) // self.gpus_per_node + 1):
                free[node] -= min(s, self.gpus_per_node)
        return free

    def describe(self) -> str:
        return f"{self} = {self.world} GPUs; group sizes {list(self.sizes)}"


def _node_count_kept(k: int) -> bool:
    """Whether groups of ``k`` whole nodes are candidates: every count up to EVERY_NODES, then 2^j and 3 x 2^j
    (candidates grow with the log of the cluster, not its size)."""
    if k <= EVERY_NODES:
        return True
    odd = k
    while odd % 2 == 0:
        odd //= 2
    return odd in (1, 3)


def _sub(ranks: tuple[int, ...], u: int) -> list[tuple[int, ...]]:
    """Ulysses sub-groups (u consecutive ranks) and ring sub-groups (stride u) of a group, as sp.groups makes."""
    return [ranks[i : i + u] for i in range(0, len(ranks), u)] + [ranks[j::u] for j in range(u)]


def _descending(sizes: Sequence[int]) -> tuple[int, ...]:
    """The multiset of sizes as placement's cache key (largest first)."""
    return tuple(sorted((int(s) for s in sizes), reverse=True))


def _node_chain(g: int) -> tuple[int, ...]:
    """The powers of two dividing ``g``, then ``g``: sizes inside a node that divide one another (1 | 2 | 4 .. | g)."""
    return tuple(dict.fromkeys((*(s for s in _powers_of_two(g) if g % s == 0), g)))


def _powers_of_two(limit: int) -> list[int]:
    out, s = [], 1
    while s <= limit:
        out.append(s)
        s *= 2
    return out


@functools.lru_cache(maxsize=64)
def _partitions(total: int, parts: tuple[int, ...]) -> list[list[int]]:
    """Maximal multisets of ``parts`` with sum <= total (no part can be added), as counts per part."""
    out: list[list[int]] = []
    smallest = min(parts)

    def walk(i: int, left: int, counts: list[int]) -> None:
        if len(out) > MAX_PATTERNS:
            return
        if i < 0:
            if left < smallest:
                out.append(list(counts))
            return
        for c in range(left // parts[i], -1, -1):
            counts[i] = c
            walk(i - 1, left - c * parts[i], counts)
        counts[i] = 0

    walk(len(parts) - 1, total, [0] * len(parts))
    return out


@functools.lru_cache(maxsize=4096)
def _place_sorted(topo: Topology, sizes: tuple[int, ...]) -> tuple[int, ...] | None:
    """First ranks of groups of ``sizes`` (descending): spanning groups on whole nodes from node 0, then the
    rest first fit decreasing into the remaining nodes; the pattern model where first fit fails."""
    g = topo.gpus_per_node
    if any(s > g and s % g for s in sizes) or any(s < 1 for s in sizes):
        raise ValueError(f"group sizes {sorted(set(sizes))} on {topo}: a group larger than a node must span whole "
                         f"nodes (valid sizes: {list(topo.sizes)})")  # fmt: skip
    firsts = _place_big(sizes, g)
    node = sum(s // g for s in sizes if s > g)
    if node > topo.nodes:
        return None
    small = [s for s in sizes if s <= g]
    used = [0] * (topo.nodes - node)  # GPUs taken in each remaining node
    for s in small:
        i = next((i for i, u in enumerate(used) if u + s <= g), None)
        if i is None:
            return _place_by_patterns(topo, sizes, node)
        firsts.append((node + i) * g + used[i])
        used[i] += s
    return tuple(firsts)


def _place_by_patterns(topo: Topology, sizes: tuple[int, ...], first_node: int) -> tuple[int, ...] | None:
    """Exact packing of the groups up to a node into the nodes from ``first_node`` on: a small integer model
    over node fillings (:meth:`Topology.patterns`), None when it proves there is none."""
    from planner.milp import INFEASIBLE, solve_patterns

    g = topo.gpus_per_node
    want = Counter(s for s in sizes if s <= g)
    demand = np.array([want.get(s, 0) for s in topo.small], dtype=float)
    if any(s not in topo.small for s in want):  # a size outside the candidates: no pattern holds it
        return None
    y = solve_patterns(topo.patterns, demand, topo.nodes - first_node)
    if y is None or y is INFEASIBLE:
        return None
    slots: dict[int, list[int]] = {}
    node = first_node
    for p, count in enumerate(y.tolist()):
        for _ in range(int(count)):
            at = node * g
            for s, c in zip(topo.small, topo.patterns[p].tolist()):
                for _ in range(c):
                    slots.setdefault(s, []).append(at)
                    at += s
            node += 1
    firsts = _place_big(sizes, g)
    for s in sizes:
        if s <= g:
            firsts.append(slots[s].pop(0))
    return tuple(firsts)


def _place_big(sizes: tuple[int, ...], g: int) -> list[int]:
    """First ranks of the groups spanning nodes (in order), on whole nodes from node 0."""
    out, node = [], 0
    for s in sizes:
        if s > g:
            out.append(node * g)
            node += s // g
    return out
