"""The read side of the stores, light to import (no model, no OpenCV: ``export``, ``stats`` and
``eval`` start in well under a second): cluster rows, displayed paths and the counts of ``stats``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from memetrace.cli.catalog import BatchCatalog
from memetrace.cli.context import Context
from memetrace.cli.footprint import bytes_per_image


def cluster_table(c: Context, absolute: bool = False) -> list:
    """Cluster rows (PIMMI's CSV), each path shown relative to the root it was indexed from
    (``absolute``: as stored; same row order)."""
    from memetrace.clusterer.export import cluster_rows  # networkx: not for `stats`
    from memetrace.clusterer.graph import build_graph

    cat, state = c.catalog, c.graph_state
    nb_points = state.images()
    g = build_graph(nb_points, state.matches())
    paths = cat.paths_by_image() if absolute else display_paths(cat)
    return cluster_rows(g, state.clusters(), paths, nb_points)


def display_paths(cat: BatchCatalog) -> dict[int, list[str]]:
    """image id -> its paths as users see them: relative to each one's own indexed root, URLs as is."""
    show = _shown(cat)
    return {i: [show(p) for p in ps] for i, ps in cat.paths_by_image().items()}


def bad_file_rows(cat: BatchCatalog) -> list[tuple[str, str, str]]:
    """(path as shown, reason, detail) of every bad file, by path."""
    show = _shown(cat)
    return [(show(p), reason, detail) for p, reason, detail in cat.bad_files()]


def _shown(cat: BatchCatalog) -> Callable[[str], str]:
    roots, root_of = cat.roots(), cat.path_roots()
    return lambda p: display_path(p, roots.get(root_of.get(p, -1)))


def display_path(path: str, root: str | None) -> str:
    if root and path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1:]
    return path


def counts(c: Context) -> dict[str, int]:
    """The batch's images, paths and bad files; the clusterer state's matches and clusters."""
    graph = c.graph_state.counts()
    return {**c.catalog.counts(), "matches": graph["matches"], "clusters": graph["clusters"]}


def few_keypoint_paths(c: Context) -> list[str]:
    """Paths of the images with fewer keypoints than ``low_texture_points`` (skies, smooth photos):
    only the low-texture rule can link them (:mod:`memetrace.matcher.low_texture`)."""
    floor = c.settings.low_texture_points
    few = {i for i, n in c.graph_state.images().items() if n < floor}
    return sorted(p for i, ps in display_paths(c.catalog).items() if i in few for p in ps)


def stored_counts(c: Context) -> dict:
    """What the stores hold, whichever mode filled them (``memetrace index`` or the streaming
    services): images and occurrences from Milvus, keypoints from the feature store, matches and
    clusters from the clusterer state, paths and bad files from the batch catalog. ``stores`` has
    the counts of each store; ``bytes_per_image`` is the place for each store's size per image."""
    milvus = _milvus_counts(c)
    graph = c.graph_state.counts()
    batch = c.catalog.counts()
    reasons: dict[str, int] = {}
    for _, reason, _ in c.catalog.bad_files():
        reasons[reason] = reasons.get(reason, 0) + 1
    features = {"keypoints": _local_keypoints(c)}
    return {"images": milvus["images"], "occurrences": milvus["occurrences"], "paths": batch["paths"],
            "bad_files": batch["bad_files"], "bad_files_by_reason": reasons, "matches": graph["matches"],
            "clusters": graph["clusters"], "few_keypoints": len(few := few_keypoint_paths(c)),
            "few_keypoint_paths": few[:10], "deadlettered": milvus["deadlettered"],
            "deadlettered_by_reason": milvus["deadlettered_by_reason"],
            "stores": {"milvus": milvus, "features": features, "cluster_state": graph, "batch_catalog": batch},
            "bytes_per_image": bytes_per_image(c.settings, milvus["images"] or batch.get("images", 0)),
            "data_dir": str(c.settings.data_dir)}


def stored_images(c: Context) -> int:
    """Images in the vector index, whichever mode stored them (0 when nothing was)."""
    return c.index.count() if _milvus_holds_data(c) else 0


def _milvus_holds_data(c: Context) -> bool:
    """Milvus has this data dir's collections; nothing is created where nothing is stored."""
    uri = c.settings.resolved_milvus_uri()
    if "://" not in uri and not Path(uri).exists():
        return False
    from memetrace.milvus import stored_dim  # pymilvus: only when there is a Milvus to ask

    return stored_dim(c.milvus, c.milvus_config) is not None


def _milvus_counts(c: Context) -> dict:
    """Counts kept in Milvus (shared by every worker)."""
    if not _milvus_holds_data(c):
        return {"images": 0, "occurrences": 0, "deadlettered": 0, "deadlettered_by_reason": {}}
    posts = c.occurrences
    return {"images": c.index.count(), "occurrences": posts.count_occurrences(),
            "deadlettered": posts.count_dead_letters(), "deadlettered_by_reason": posts.dead_letters_by_reason()}


def _local_keypoints(c: Context) -> int | None:
    """Images with keypoints in the local feature store; None for S3 (listing a bucket is not a
    count worth waiting for)."""
    if c.settings.feature_store != "local":
        return None
    from memetrace.feature_store import LocalFeatureStore

    return c.features.count("keypoints") if isinstance(c.features, LocalFeatureStore) else None
