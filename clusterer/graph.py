"""Clusters of copies: communities of the verified-match graph, with ids that stay stable.

``communities`` turns edges into groups (connected components, or Louvain to cut weak bridges);
``stable_ids`` names them so that a cluster keeps its id across runs: each new group inherits
the id of the earlier cluster it shares most images with (largest groups choose first, so a
merge keeps the larger side's id and a split leaves the id with the larger part).
"""

from __future__ import annotations

from collections import Counter
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


def communities(g: nx.Graph, algorithm: str = "components", seed: int = 0) -> list[set[int]]:
    """Groups of images, biggest first; every node is in exactly one group (singletons too)."""
    if algorithm == "louvain":
        groups = [set(c) for c in nx.community.louvain_communities(g, weight="weight", seed=seed)]
    elif algorithm == "components":
        groups = [set(c) for c in nx.connected_components(g)]
    else:
        raise ValueError(f"unknown cluster algorithm {algorithm!r}: use components or louvain")
    return sorted(groups, key=lambda c: (-len(c), min(c)))


def stable_ids(groups: Sequence[set[int]], previous: dict[int, int]) -> dict[int, int]:
    """image -> cluster id, reusing the id of the previous cluster each group overlaps most."""
    next_id = max(previous.values(), default=0) + 1
    taken: set[int] = set()
    assignment: dict[int, int] = {}
    for group in groups:  # biggest first: the larger side of a merge or split keeps the id
        votes = Counter(previous[i] for i in group if i in previous)
        cid = next((c for c, _ in votes.most_common() if c not in taken), None)
        if cid is None:
            cid, next_id = next_id, next_id + 1
        taken.add(cid)
        for image in group:
            assignment[image] = cid
    return assignment


def density(g: nx.Graph, group: set[int]) -> float:
    """Share of possible edges present: 1.0 for a clique, low for a chain of weak links."""
    n = len(group)
    return 1.0 if n < 2 else 2.0 * g.subgraph(group).number_of_edges() / (n * (n - 1))
