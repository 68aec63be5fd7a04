"""The batch pipeline (``memetrace index``): index a folder or list file, match the new images,
recluster, all in one process on the embedded stores.

It keeps its own record (:class:`~memetrace.cli.catalog.BatchCatalog`: paths, bad files, which
images it matched) and feeds the clusterer's :class:`~memetrace.clusterer.state.GraphState` like
the clusterer service does from its topics: the images it matched, their edges, and each file as
an occurrence on platform "file"; then it reclusters that state."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

from tqdm import tqdm

from memetrace.cli.catalog import BatchCatalog
from memetrace.cli.context import Context
from memetrace.clusterer.export import cluster_rows
from memetrace.clusterer.graph import build_graph
from memetrace.clusterer.service import recluster
from memetrace.clusterer.state import GraphState
from memetrace.decode_budget import DecodeBudget
from memetrace.fetch import Fetcher, FetchPolicy
from memetrace.ingest.indexer import Indexer, IndexConfig, IndexReport, Outcome, Stored, Unindexable
from memetrace.ingest.sources import iter_directory, iter_list_file
from memetrace.matcher.matching import MatchConfig, Matcher
from memetrace.models import Match
from memetrace.settings import Settings


def progress(total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)


def run_index(c: Context, source: Path) -> dict:
    """index -> match the new images -> recluster; returns the run summary."""
    s = c.settings
    batch, state = c.catalog, c.graph_state  # both opened first: a refused file stops the run before any work
    known = batch.indexed_paths()
    if source.is_dir():
        batch.set_meta("root", str(source.resolve()))
        items = [it for it in iter_directory(source, s.max_file_bytes) if it.key not in known]
    else:
        batch.set_meta("root", str(source.resolve().parent))
        items = [it for it in iter_list_file(source, s.max_file_bytes, url_reader(s)) if it.key not in known]
    timings: dict[str, float] = {}
    started = time.time_ns() // 1_000_000  # compared with Milvus' indexed_at (ms)
    t0 = time.perf_counter()
    indexer = Indexer(IndexConfig.from_settings(s), c.embedder, c.extractor, c.index, c.features,
                      decode_budget=DecodeBudget.from_settings(s))
    report = IndexReport()
    with progress(len(items), "index") as bar:
        for outcomes in indexer.index(items):  # recorded per chunk: a stopped run keeps what it stored
            record(batch, outcomes)
            report.add(outcomes)
            bar.update(len(outcomes))
    timings["index_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    todo = to_match(batch, state)
    matcher = Matcher(MatchConfig.from_settings(s), c.index, c.features)
    with progress(len(todo), "match") as bar:
        matches = matcher.match_stored(todo, bar.update, all_stored_since=started)
    feed(state, batch, todo, matches, known)
    batch.mark_matched(todo)  # after the state has them: a run stopped in between redoes them
    timings["match_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    recluster(state, s.cluster_algorithm, publish=c.board.publish)
    timings["cluster_s"] = round(time.perf_counter() - t0, 2)
    return {"inputs": report.seen, "new_images": report.new_images, "duplicates": report.duplicates,
            "bad_inputs": report.bad, "new_matches": len(matches), **counts(c), **timings}


def record(batch: BatchCatalog, outcomes: list[Outcome]) -> None:
    """The batch's record of indexed inputs: each stored file's path and image, each refused one's reason."""
    stored = [o for o in outcomes if isinstance(o, Stored)]
    batch.add_images((o.image_id, o.nb_points) for o in stored)
    batch.add_paths((o.key, o.image_id) for o in stored)
    batch.add_bad((o.key, o.reason, o.detail) for o in outcomes if isinstance(o, Unindexable))


def counts(c: Context) -> dict[str, int]:
    """The batch's images, paths and bad files; the clusterer state's matches and clusters."""
    graph = c.graph_state.counts()
    return {**c.catalog.counts(), "matches": graph["matches"], "clusters": graph["clusters"]}


def to_match(batch: BatchCatalog, state: GraphState) -> list[int]:
    """The batch's images not matched yet, and those the clusterer state lacks (its file was
    deleted or refused as outdated): matching them again refills it."""
    return sorted(set(batch.unmatched()) | (batch.images().keys() - state.images().keys()))


def feed(state: GraphState, batch: BatchCatalog, matched: list[int], matches: list[Match],
         known_paths: Collection[str]) -> None:
    """Hands the clusterer what this run learnt: the ``matched`` images with their edges, and as
    occurrences the files new to this run or showing a ``matched`` image (writes are idempotent)."""
    nb_points, todo = batch.images(), set(matched)
    state.add_images((i, nb_points[i]) for i in matched)
    state.add_matches(matches)
    state.add_posts((f"file:{path}", image_id, -1, "file") for image_id, paths in batch.paths_by_image().items()
                    for path in paths if image_id in todo or path not in known_paths)


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
    cat, state = c.catalog, c.graph_state
    nb_points = state.images()
    g = build_graph(nb_points, state.matches())
    root = cat.meta("root")
    paths = {i: [display_path(p, root) for p in ps] for i, ps in cat.paths_by_image().items()}
    return cluster_rows(g, state.clusters(), paths, nb_points)


def display_path(path: str, root: str | None) -> str:
    if root and path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1:]
    return path
