"""Clusters of copies: communities of the verified-match graph, with ids that stay stable.

``partition`` turns edges into groups (connected components, or Louvain to cut weak bridges)
one connected component at a time: Louvain runs on each component alone, built in sorted order,
so a component's communities do not depend on the rest of the graph and a run that recomputes
only the components that changed finds what a full recomputation would. ``stable_ids`` names
them so that a cluster keeps its id across runs: each new group inherits the id of the earlier
cluster it shares most images with (largest groups choose first, so a merge keeps the larger
side's id and a split leaves the id with the larger part; a tie goes to the older, smaller id).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import networkx as nx

from memetrace.models import Match


def build_graph(nodes: Iterable[int], matches: Iterable[Match]) -> nx.Graph:
    """The graph of ``nodes`` and the ``matches`` between two of them; an edge touching an image
    not (yet) in ``nodes`` is held back (the stream may deliver an edge before an image event)."""
    g = nx.Graph()
    g.add_nodes_from(nodes)
    for m in matches:
        if m.a in g and m.b in g and m.a != m.b:
            g.add_edge(m.a, m.b, weight=float(m.inliers), kind=m.kind)
    return g


Edge = tuple[int, int, float]  # a < b, weight (inliers)


def communities(g: nx.Graph, algorithm: str = "components", seed: int = 0) -> list[set[int]]:
    """Groups of images, biggest first; every node is in exactly one group (singletons too)."""
    return partition(g.nodes, [(min(u, v), max(u, v), d["weight"]) for u, v, d in g.edges(data=True)], algorithm, seed)


def partition(nodes: Iterable[int], edges: Iterable[Edge], algorithm: str = "components",
              seed: int = 0) -> list[set[int]]:
    """:func:`communities` of the graph of ``nodes`` and ``edges`` (both ends in ``nodes``)."""
    edges = list(edges)
    return communities_of(components(nodes, edges), edges, algorithm, seed)


def communities_of(parts: list[set[int]], edges: list[Edge], algorithm: str = "components",
                   seed: int = 0) -> list[set[int]]:
    """:func:`partition` of the graph whose connected components are ``parts``."""
    if algorithm not in ("components", "louvain"):
        raise ValueError(f"unknown cluster algorithm {algorithm!r}: use components or louvain")
    if algorithm == "components":
        return parts
    within: dict[int, list[Edge]] = defaultdict(list)
    first = {image: min(part) for part in parts for image in part}
    for e in edges:
        within[first[e[0]]].append(e)
    louvain = [c for part in parts for c in _louvain(part, within[min(part)], seed)]
    return sorted(louvain, key=lambda c: (-len(c), min(c)))


def components(nodes: Iterable[int], edges: Iterable[Edge]) -> list[set[int]]:
    """Connected components (union-find), biggest first, ties by smallest id."""
    parent = {n: n for n in nodes}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for e in edges:
        ra, rb = root(e[0]), root(e[1])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, set[int]] = defaultdict(set)
    for n in parent:
        groups[root(n)].add(n)
    return sorted(groups.values(), key=lambda c: (-len(c), min(c)))


def _louvain(members: set[int], edges: list[Edge], seed: int) -> list[set[int]]:
    if len(members) < 3:
        return [members]
    g = nx.Graph()  # sorted: Louvain's visiting order, hence its result, depends only on the component
    g.add_nodes_from(sorted(members))
    g.add_weighted_edges_from(sorted(edges))
    return [set(c) for c in nx.community.louvain_communities(g, weight="weight", seed=seed)]


def stable_ids(groups: Sequence[set[int]], previous: dict[int, int], next_id: int | None = None) -> dict[int, int]:
    """image -> cluster id, reusing the id of the previous cluster each group overlaps most; a fresh
    id counts up from ``next_id`` (default: above every previous id)."""
    next_id = max(previous.values(), default=0) + 1 if next_id is None else next_id
    taken: set[int] = set()
    assignment: dict[int, int] = {}
    for group in groups:  # biggest first: the larger side of a merge or split keeps the id
        cid = choose(Counter(previous[i] for i in group if i in previous), taken)
        if cid is None:
            cid, next_id = next_id, next_id + 1
        taken.add(cid)
        for image in group:
            assignment[image] = cid
    return assignment


def choose(votes: Counter[int], taken: set[int]) -> int | None:
    """The most voted id not taken yet, a tie to the smaller id (not set order: runs must agree)."""
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))
    return next((c for c, _ in ranked if c not in taken), None)


def density(g: nx.Graph, group: set[int]) -> float:
    """Share of possible edges present: 1.0 for a clique, low for a chain of weak links."""
    n = len(group)
    return 1.0 if n < 2 else 2.0 * g.subgraph(group).number_of_edges() / (n * (n - 1))
