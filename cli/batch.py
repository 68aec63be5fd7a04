"""The batch pipeline (``memetrace index``): index a folder or list file, match the new images,
recluster, all in one process on the embedded stores."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from memetrace.cli.context import Context
from memetrace.clusterer.export import cluster_rows
from memetrace.clusterer.graph import build_graph
from memetrace.clusterer.service import recluster
from memetrace.ingest.fetch import Fetcher, FetchPolicy
from memetrace.ingest.indexer import Indexer
from memetrace.ingest.sources import iter_directory, iter_list_file
from memetrace.matcher.matching import Matcher
from memetrace.settings import Settings


def progress(total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)


def run_index(c: Context, source: Path) -> dict:
    """index -> match the new images -> recluster; returns the run summary."""
    s = c.settings
    known = c.catalog.indexed_paths()
    if source.is_dir():
        c.catalog.set_meta("root", str(source.resolve()))
        items = [it for it in iter_directory(source, s.max_file_bytes) if it.key not in known]
    else:
        c.catalog.set_meta("root", str(source.resolve().parent))
        items = [it for it in iter_list_file(source, s.max_file_bytes, url_reader(s)) if it.key not in known]
    timings: dict[str, float] = {}
    started = time.time_ns() // 1_000_000  # compared with Milvus' indexed_at (ms)
    t0 = time.perf_counter()
    indexer = Indexer(s, c.embedder, c.extractor, c.store, c.features, c.catalog)
    with progress(len(items), "index") as bar:
        report = indexer.index(items, bar.update)
    timings["index_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    todo = c.catalog.unmatched()
    matcher = Matcher(s, c.store, c.features)
    with progress(len(todo), "match") as bar:
        matches = matcher.match_stored(todo, bar.update, all_stored_since=started)
    c.catalog.add_matches(matches)
    c.catalog.mark_matched(todo)
    timings["match_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    recluster(c.catalog, s.cluster_algorithm, publish=c.store.publish_clusters)
    timings["cluster_s"] = round(time.perf_counter() - t0, 2)
    return {"inputs": report.seen, "new_images": report.new_images, "duplicates": report.duplicates,
            "bad_inputs": report.bad, "new_matches": len(matches), **c.catalog.counts(), **timings}


def url_reader(s: Settings) -> Callable[[str], bytes]:
    """Reads a URL of a list file through the SSRF-guarded fetcher."""
    fetcher = Fetcher(FetchPolicy.from_settings(s))

    def read(url: str) -> bytes:
        res = fetcher.fetch(url)
        if not res.ok or res.data is None:
            raise ValueError(f"download failed ({res.reason}): {res.detail}")
        return res.data

    return read


def cluster_table(c: Context) -> list:
    """Cluster rows with paths shown relative to the last indexed folder (PIMMI's CSV)."""
    cat = c.catalog
    nb_points = cat.images()
    g = build_graph(nb_points, cat.matches())
    root = cat.meta("root")
    paths = {i: [display_path(p, root) for p in ps] for i, ps in cat.paths_by_image().items()}
    return cluster_rows(g, cat.clusters(), paths, nb_points)


def display_path(path: str, root: str | None) -> str:
    if root and path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1:]
    return path
