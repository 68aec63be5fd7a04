"""How derivation trees follow the clusters: :func:`update_trees` redoes the tree of every cluster a reclustering run touched
(``ClusterRun.touched``) from the clusterer's state: members, their earliest observed posts (files
indexed, platform "file", are not posts) and their matches' geometry; thumbnails, when a feature
store is given, add the appearance distance (:func:`memetrace.clusterer.tree.appearance_distance`).
A tree is replaced whole, keyed by cluster id, so a redelivered batch (which touches the same
clusters with the same inputs) writes the same rows again: nothing changes.
The trees are kept in a :class:`~memetrace.tree_store.TreeStore`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Collection, Iterable, Mapping

import numpy as np
from PIL import Image

from memetrace.clusterer.state import GraphState
from memetrace.clusterer.metrics import COPY_RANKS, TreeMetrics
from memetrace.clusterer.tree import TreeConfig, appearance_distance, copy_delays, depth, forest
from memetrace.feature_store import FeatureStore
from memetrace.models import Derivation, Match
from memetrace.tree_store import NOT_POSTS, TreeStore



def first_posts(state: GraphState, image_ids: Collection[int]) -> dict[int, int]:
    """Each image's earliest observed post (unix s); images with no post are left out."""
    out: dict[int, int] = {}
    for s in state.occurrence_stats(time.time(), image_ids):
        if s.platform not in NOT_POSTS:
            out[s.image_id] = min(out.get(s.image_id, s.first), s.first)
    return out


def thumbnail(features: FeatureStore, image_id: int) -> np.ndarray | None:
    data = features.get_thumbnail(image_id)
    if data is None:
        return None
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def distances(matches: Iterable[Match], features: FeatureStore | None) -> dict[tuple[int, int], float]:
    """Appearance distance of each match with geometry whose two thumbnails are stored."""
    if features is None:
        return {}
    thumbs: dict[int, np.ndarray | None] = {}
    out = {}
    for m in matches:
        for i in (m.a, m.b):
            if i not in thumbs:
                thumbs[i] = thumbnail(features, i)
        ta, tb = thumbs[m.a], thumbs[m.b]
        if m.geometry is not None and ta is not None and tb is not None:
            out[m.a, m.b] = appearance_distance(ta, tb, m.geometry)
    return out


def cluster_tree(state: GraphState, members: Collection[int], features: FeatureStore | None,
                 cfg: TreeConfig = TreeConfig()) -> list[Derivation]:
    """The derivation forest of one cluster's ``members``, read from the state."""
    inside = set(members)
    edges = [m for m in state.edges_of(inside) if m.a in inside and m.b in inside]
    tree = forest(sorted(inside), first_posts(state, inside), edges, cfg, distances(edges, features))
    return [tree[i] for i in sorted(tree)]


def members_of(state: GraphState, cluster_ids: Collection[int]) -> dict[int, list[int]]:
    wanted, out = set(cluster_ids), {}
    for image_id, cid in state.clusters().items():
        if cid in wanted:
            out.setdefault(cid, []).append(image_id)
    return out


def update_trees(state: GraphState, features: FeatureStore | None, store: TreeStore,
                 cluster_ids: Collection[int], cfg: TreeConfig = TreeConfig(),
                 metrics: TreeMetrics | None = None) -> int:
    """Redo the trees of ``cluster_ids`` (a run's touched clusters); a cluster now gone or of one
    image loses its tree. Returns the trees written."""
    members = members_of(state, cluster_ids)
    written = 0
    for cid in sorted(set(cluster_ids)):
        ids = members.get(cid, [])
        tree = cluster_tree(state, ids, features, cfg) if len(ids) > 1 else []
        store.put(cid, tree)
        written += bool(tree)
        if tree and metrics is not None:
            observe(metrics, state, {d.image_id: d for d in tree})
    return written


def observe(metrics: TreeMetrics, state: GraphState, tree: Mapping[int, Derivation]) -> None:
    stats = [s for s in state.occurrence_stats(time.time(), list(tree)) if s.platform not in NOT_POSTS]
    for n, seconds in copy_delays(first_posts(state, list(tree)), COPY_RANKS).items():
        metrics.copy_delay.labels(str(n)).observe(seconds)
    metrics.platforms.observe(len({s.platform for s in stats}))
    metrics.depth.observe(depth(tree))
    metrics.trees.inc()


def all_trees(state: GraphState, features: FeatureStore | None, store: TreeStore,
              cfg: TreeConfig = TreeConfig()) -> Mapping[int, list[Derivation]]:
    """Rebuild every cluster's tree (and drop those of clusters gone); cluster id -> tree."""
    live = {c for c, ids in members_of(state, set(state.clusters().values())).items() if len(ids) > 1}
    update_trees(state, features, store, live | set(store.cluster_ids()), cfg)
    return {c: store.get(c) for c in sorted(live)}
