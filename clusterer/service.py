"""Recompute clusters from the catalog's matches and store them with stable ids."""

from __future__ import annotations

from clusterer.graph import build_graph, communities, stable_ids
from memetrace.catalog import Catalog


def recluster(catalog: Catalog, algorithm: str) -> dict[int, int]:
    g = build_graph(catalog.images(), catalog.matches())
    assignment = stable_ids(communities(g, algorithm), catalog.clusters())
    catalog.set_clusters(assignment)
    return assignment
