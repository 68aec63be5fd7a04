"""How derivation trees follow the clusters: :func:`update_trees` redoes the tree of every cluster
a reclustering run touched (``ClusterRun.touched``) from the clusterer's state: members, their earliest observed posts (files
indexed, platform "file", are not posts) and their matches' geometry; thumbnails, when a feature
store is given, add the appearance distance (:func:`memetrace.clusterer.tree.appearance_distance`)
and, read only for a member whose parent and grandparent nearly tie, the inheritance cue
(:func:`memetrace.clusterer.tree.inheritance`).
A tree is replaced whole, keyed by cluster id, so a redelivered batch (which touches the same
clusters with the same inputs) writes the same rows again: nothing changes.
Given a :data:`PairVerifier` (the composition root builds it on the matcher's verifier), every pair
of a small cluster (``TreeConfig.max_verified_pairs``) is verified again for the tree: the matcher
verifies each image's few best candidates only (in a tree of near-identical copies the true parent
is often not among them), and in the order the images came (a pair's inliers and geometry depend
on which side is the query); verified again, a tree no longer depends on the arrival order, so a
folder run and a streaming run give the same trees. Those matches feed the tree only.
A :class:`TreeEdgeCache` (one a process, kept across runs) saves that verification and the
thumbnails' distances for a cluster whose members and stored edges did not change: in a stream
most touches only add posts to existing images (exact reposts share an image id).
The trees are kept in a :class:`~memetrace.tree_store.TreeStore`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache as cache_calls, partial

import numpy as np
from PIL import Image

from memetrace.byte_lru import ByteLRU
from memetrace.clusterer.state import GraphState
from memetrace.clusterer.metrics import COPY_RANKS, TreeMetrics
from memetrace.clusterer.tree import Thumbnails, TreeConfig, appearance_distance, copy_delays, depth, forest
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


def distances(matches: Iterable[Match], read: Thumbnails | None) -> dict[tuple[int, int], float]:
    """Appearance distance of each match with geometry whose two thumbnails are stored (``read``:
    memoized, each thumbnail is decoded once)."""
    if read is None:
        return {}
    out = {}
    for m in matches:
        ta, tb = read(m.a), read(m.b)
        if m.geometry is not None and ta is not None and tb is not None:
            out[m.a, m.b] = appearance_distance(ta, tb, m.geometry)
    return out


#: verifies the given pairs (a < b) of stored images, file sizes (w, h) by id where known: the
#: verified ones, with geometry (the composition root hands in memetrace.matcher's Matcher.verify_pairs)
PairVerifier = Callable[[Sequence[tuple[int, int]], Mapping[int, tuple[int, int]]], list[Match]]


def verified_pairs(members: Collection[int], edges: Sequence[Match], verify: PairVerifier, max_pairs: int) -> list[Match]:
    """Every pair of ``members`` verified by ``verify`` (the lower id as the query, whatever order the
    matcher met them in); just ``edges`` when there are more than ``max_pairs`` pairs. File sizes
    come from the edges' geometry. A stored edge this verification turns down is left out: it holds
    because of the order the matcher met the pair in (a stream's arrival order), and with it a
    streaming run's tree differed from the folder run's on a near tie (measured on the dev
    propagation set: parent accuracy 0.747 with it, 0.746 without)."""
    ids = sorted(members)
    if len(ids) * (len(ids) - 1) // 2 > max_pairs:
        return list(edges)
    sizes = {i: s for m in edges if m.geometry is not None
             for i, s in ((m.a, m.geometry.size_a), (m.b, m.geometry.size_b))}
    found = {(m.a, m.b): m for m in verify([(a, b) for k, a in enumerate(ids) for b in ids[k + 1:]], sizes)}
    return list(found.values())


@dataclass(frozen=True)
class ClusterEdges:
    """What a cluster's tree is drawn on, made from its members and the state's edges among them."""

    stored: tuple[Match, ...]  # the state's edges among the members, as read
    edges: tuple[Match, ...]  # the tree's: those of verified_pairs (the stored ones without a verifier)
    distances: Mapping[tuple[int, int], float]  # the edges' appearance distances (distances())


#: bytes a cached Match is counted for (with its Geometry: ~0.7 KB traced for its objects and
#: tuples, ~0.5 KB for its numbers; less without geometry) and a distance (its (a, b) key and float)
MATCH_BYTES, DISTANCE_BYTES = 1200, 200
#: 64 MB: a cluster of up to 30 images (max_verified_pairs) is under 1.3 MB (its 435 pairs and as
#: many stored edges), the usual few-image one a few KB; a stream touches its recent clusters again
#: and again, and those fit many times over
TREE_CACHE_BYTES = 64 * 2**20


def _nbytes(c: ClusterEdges) -> int:
    """An estimate: each Match once (a large cluster's tree edges are its stored ones)."""
    return MATCH_BYTES * len({id(m) for m in c.stored + c.edges}) + DISTANCE_BYTES * len(c.distances)


class TreeEdgeCache(ByteLRU[frozenset[int], ClusterEdges]):
    """A cluster's :class:`ClusterEdges` by member set, for one feature store, verifier and TreeConfig. Exact:
    the verification and the thumbnails depend on the member set only (an id is its content's hash,
    its keypoints and thumbnail never change; the verifier reads a query's candidates together, so
    no pair's result is reused on its own), and an entry serves only the same stored edges."""

    def __init__(self, max_bytes: int = TREE_CACHE_BYTES) -> None:
        super().__init__(max_bytes, _nbytes)


def cluster_edges(members: Collection[int], stored: tuple[Match, ...], read: Thumbnails | None,
                  cfg: TreeConfig, verify: PairVerifier | None, cache: TreeEdgeCache | None) -> ClusterEdges:
    """The edges of ``members``' tree (with ``verify``: :func:`verified_pairs`) and their distances;
    ``cache``'s where it holds them made from the same ``stored`` edges."""
    key = frozenset(members)
    hit, kept = cache.get(key) if cache is not None else (False, None)
    if hit and kept is not None and kept.stored == stored:
        return kept
    edges = tuple(verified_pairs(key, stored, verify, cfg.max_verified_pairs)) if verify is not None else stored
    made = ClusterEdges(stored, edges, distances(edges, read))
    if cache is not None:
        cache.put(key, made)
    return made


def cluster_tree(state: GraphState, members: Collection[int], features: FeatureStore | None,
                 cfg: TreeConfig = TreeConfig(), verify: PairVerifier | None = None,
                 cache: TreeEdgeCache | None = None) -> list[Derivation]:
    """The derivation forest of one cluster's ``members``, read from the state (with ``verify``:
    on the matches of :func:`verified_pairs`; with ``cache``: those kept where they still hold)."""
    inside = set(members)
    stored = tuple(m for m in state.edges_of(inside) if m.a in inside and m.b in inside)
    # one decode per thumbnail for both the distances and the inheritance cue (which asks only for
    # its near ties' thumbnails: with the distances cached, most are never read)
    read = cache_calls(partial(thumbnail, features)) if features is not None else None
    made = cluster_edges(inside, stored, read, cfg, verify, cache)
    tree = forest(sorted(inside), first_posts(state, inside), made.edges, cfg, made.distances, read)
    return [tree[i] for i in sorted(tree)]


def members_of(state: GraphState, cluster_ids: Collection[int]) -> dict[int, list[int]]:
    wanted, out = set(cluster_ids), {}
    for image_id, cid in state.clusters().items():
        if cid in wanted:
            out.setdefault(cid, []).append(image_id)
    return out


def update_trees(state: GraphState, features: FeatureStore | None, store: TreeStore,
                 cluster_ids: Collection[int], cfg: TreeConfig = TreeConfig(),
                 metrics: TreeMetrics | None = None, verify: PairVerifier | None = None,
                 cache: TreeEdgeCache | None = None) -> int:
    """Redo the trees of ``cluster_ids`` (a run's touched clusters); a cluster now gone or of one
    image loses its tree. Returns the trees written. ``cache``: the process's, kept across runs."""
    members = members_of(state, cluster_ids)
    written = 0
    for cid in sorted(set(cluster_ids)):
        ids = members.get(cid, [])
        tree = cluster_tree(state, ids, features, cfg, verify, cache) if len(ids) > 1 else []
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


def current_trees(state: GraphState, features: FeatureStore | None, store: TreeStore,
                  cfg: TreeConfig = TreeConfig(), verify: PairVerifier | None = None,
                  cache: TreeEdgeCache | None = None) -> Mapping[int, list[Derivation]]:
    """Every cluster's tree, cluster id -> tree: the stored one where it holds the cluster's members
    (index and the clusterer service keep them so), the others redone; trees of clusters gone are dropped."""
    live = {c: set(ids) for c, ids in members_of(state, set(state.clusters().values())).items() if len(ids) > 1}
    stale = {c for c, ids in live.items() if {d.image_id for d in store.get(c)} != ids}
    update_trees(state, features, store, stale | (set(store.cluster_ids()) - live.keys()), cfg,
                 verify=verify, cache=cache)
    return {c: store.get(c) for c in sorted(live)}
