"""The batch pipeline (``memetrace index``): index folders, image files and list files, match the
new images, recluster, all in one process on the embedded stores; and keep the stores true to the
folders (``prune``, ``remove``, ``reset``).

A run reads the files it has not indexed yet and the known ones changed in place (size or mtime
differ, then the content hash confirms: a file only touched is not read again); an image no file
shows any more (replaced, removed, pruned) leaves every store (:func:`forget_images`). Indexed
files that disappeared are counted (``missing_files``), and removed by ``memetrace prune`` only:
a folder unmounted for a while must not empty the index.

It keeps its own record (:class:`~memetrace.cli.catalog.BatchCatalog`: paths, bad files, which
images it matched) and feeds the clusterer's :class:`~memetrace.clusterer.state.GraphState` like
the clusterer service does from its topics: the images it matched, their edges, and each file as
an occurrence on platform "file"; then it reclusters that state."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from memetrace.cli.catalog import BatchCatalog, PathRow
from memetrace.cli.context import Context
from memetrace.cli.tables import (bad_file_rows, cluster_table, counts, display_path,  # noqa: F401 (re-exported)
                                  few_keypoint_paths)
from memetrace.cli.posts import PostsReport, read_posts, record_posts
from memetrace.clusterer.service import recluster
from memetrace.clusterer.tree_update import update_trees
from memetrace.clusterer.state import GraphState
from memetrace.decode_budget import DecodeBudget
from memetrace.fetch import Fetcher, FetchPolicy
from memetrace.imageio import content_id
from memetrace.ingest.sources import InputItem, Source, Walk, is_url, open_sources
from memetrace.lite_server import other_host
from memetrace.models import Match
from memetrace.settings import Settings

if TYPE_CHECKING:  # the model (torch, timm) and the matcher load in run_index: prune, remove, reset stay light
    from memetrace.ingest.indexer import Outcome


def progress(total: int | None, desc: str, shown: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not shown)


@dataclass(frozen=True)
class IndexOptions:
    """Per-run flags of ``memetrace index`` (None: the setting's value)."""

    workers: int | None = None  # threads decoding and verifying (MEMETRACE_PREPARE_THREADS, _MATCH_THREADS)
    exclude: tuple[str, ...] = ()  # globs, see :class:`~memetrace.ingest.sources.Walk`
    limit: int | None = None  # read at most this many new or changed files this run
    follow_links: bool = False  # enter symlinked folders

    def settings(self, s: Settings) -> Settings:
        if self.workers is None:
            return s
        return s.model_copy(update={"prepare_threads": self.workers, "match_threads": self.workers})


@dataclass
class Plan:
    """What one run reads: new and changed files (``items``), and what it learnt from listing."""

    items: list[InputItem] = field(default_factory=list)
    root_of: dict[str, int] = field(default_factory=dict)  # key -> root id, for every listed item
    listed: set[str] = field(default_factory=set)
    changed: int = 0  # files read again: size or mtime changed, and the content too
    touched: list[PathRow] = field(default_factory=list)  # size or mtime changed, same content


def run_index(c: Context, source: str | Path | Sequence[str | Path], posts_csv: Path | None = None,
              show_progress: bool = True, options: IndexOptions = IndexOptions()) -> dict:
    """index -> match the new images -> recluster; returns the run summary. ``source``: folders,
    image files and list files (:func:`~memetrace.ingest.sources.open_sources`: UnsupportedInput
    before any work). ``posts_csv``: the posts that showed the files (:mod:`memetrace.cli.posts`),
    recorded as occurrences."""
    s = options.settings(c.settings)
    walk = Walk(tuple(options.exclude), options.follow_links)
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    sources = open_sources(paths, s.max_file_bytes, url_reader(s), walk)
    posts_report = PostsReport()
    posts = read_posts(posts_csv, posts_report) if posts_csv else []  # a bad CSV stops the run before any work
    batch, state = open_stores(c, with_embedder=True)
    from memetrace.ingest.indexer import Indexer, IndexConfig, IndexReport  # loaded by the embedder already

    files = batch.files()
    known = set(files)
    plan = plan_run(batch, sources, files, options.limit)
    batch.add_paths(plan.touched)
    timings: dict[str, float] = {}
    started = time.time_ns() // 1_000_000  # compared with Milvus' indexed_at (ms)
    t0 = time.perf_counter()
    indexer = Indexer(IndexConfig.from_settings(s), c.embedder, c.extractor, c.index, c.features,
                      decode_budget=DecodeBudget.from_settings(s))
    report = IndexReport()
    items = {it.key: it for it in plan.items}
    with progress(len(plan.items), "index", show_progress) as bar:
        for outcomes in indexer.index(plan.items):  # recorded per chunk: a stopped run keeps what it stored
            record(batch, outcomes, plan.root_of, items, known)
            report.add(outcomes)
            bar.update(len(outcomes))
    replaced = forget_images(c, orphans(batch))  # the images of files read again that no file shows any more
    timings["index_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    todo = to_match(batch, state)
    matcher = c.matcher
    with progress(len(todo), "match", show_progress) as bar:
        matches = matcher.match_stored(todo, bar.update, all_stored_since=started)
    feed(state, batch, todo, matches, known)
    batch.mark_matched(todo)  # after the state has them: a run stopped in between redoes them
    if posts_csv:
        image_of = {p: i for i, ps in batch.paths_by_image().items() for p in ps}
        record_posts(posts, image_of, state, c.occurrences, posts_report)
    timings["match_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    reclustered = recluster(state, s.cluster_algorithm, publish=c.board.publish)
    timings["cluster_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    update_trees(state, c.features, c.trees, reclustered.touched, verify=matcher.verify_pairs, cache=c.tree_edges)
    timings["tree_s"] = round(time.perf_counter() - t0, 2)
    return {"inputs": report.seen, "new_images": report.new_images, "duplicates": report.duplicates,
            "bad_inputs": report.bad, "new_matches": len(matches), "changed_files": plan.changed,
            "replaced_images": replaced, "missing_files": len(missing_files(batch.files(), plan.listed)),
            "few_keypoints": len(few_keypoint_paths(c)),
            **counts(c), **timings, **({"posts": posts_report.as_dict()} if posts_csv else {})}


def exit_if_console(c: Context) -> None:
    """End the ``memetrace`` console-script process now that its output is written: close the
    stores, run the exit handlers (the Milvus Lite this process serves closes there), then leave
    without Python's teardown of torch and the other loaded modules (1.4 s of CPU, 3 s under load,
    for nothing). In-process callers (tests, notebooks, ``python -m``) are left running."""
    if Path(getattr(sys.modules.get("__main__"), "__file__", None) or "").name != "memetrace":
        return
    c.close()
    atexit._run_exitfuncs()  # what the interpreter runs at exit: Milvus Lite's close, logging's flush
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def open_stores(c: Context, with_embedder: bool = False) -> tuple[BatchCatalog, GraphState]:
    """Every store a run writes, opened before anything is written: one that cannot be opened
    (a refused file, Milvus held by another process) stops the run with the stores untouched.
    ``with_embedder``: the model loads meanwhile; Milvus is opened in a thread beside it, since
    creating its collections is mostly waiting (pymilvus sleeps 0.5 s per index it builds)."""
    with ThreadPoolExecutor(1, thread_name_prefix="open-milvus") as pool:
        milvus = pool.submit(lambda: [getattr(c, store) for store in ("board", "occurrences", "index")])
        for store in ("catalog", "graph_state", "features", "trees", *(("embedder",) if with_embedder else ())):
            getattr(c, store)
        milvus.result()
    return c.catalog, c.graph_state


def plan_run(batch: BatchCatalog, sources: Sequence[Source], files: dict[str, PathRow], limit: int | None) -> Plan:
    """The files to read: new ones, and known ones whose size or mtime changed and whose content
    hash differs (same content: only the new size and mtime are kept, in ``touched``)."""
    plan = Plan()
    for src in sources:
        root_id = batch.add_root(str(src.root))
        for item in src.items():
            if item.key in plan.listed:  # named twice (a folder and a file in it): read once
                continue
            plan.listed.add(item.key)
            plan.root_of.setdefault(item.key, files[item.key].root_id if item.key in files else root_id)
            if limit is not None and len(plan.items) >= limit:
                continue
            old = files.get(item.key)
            if old is None:
                plan.items.append(item)
            elif item.size >= 0 and (item.size, item.mtime_ns) != (old.size, old.mtime_ns):
                if same_content(item, old.image_id):
                    plan.touched.append(old._replace(size=item.size, mtime_ns=item.mtime_ns))
                else:
                    plan.items.append(item)
                    plan.changed += 1
    return plan


def same_content(item: InputItem, image_id: int) -> bool:
    try:
        return content_id(item.read()) == image_id
    except (OSError, ValueError):  # unreadable now: the indexer reads it again and records why
        return False


def missing_files(files: dict[str, PathRow], listed: Collection[str]) -> list[str]:
    """Indexed local files that are gone (listed this run: there; URLs: never checked)."""
    return sorted(p for p, r in files.items() if r.size >= 0 and p not in listed and not os.path.lexists(p))


def orphans(batch: BatchCatalog) -> list[int]:
    """Images of the catalog that no path shows any more."""
    return sorted(batch.images().keys() - batch.paths_by_image().keys())


def forget_images(c: Context, image_ids: Sequence[int]) -> int:
    """Removes images from every store: vector index, feature store, occurrence log, published
    clusters, clusterer state (their clusters shrink, split or dissolve on the next recluster),
    and the catalog last: a run stopped half-way leaves them in the catalog, without a path, and
    the next removal finishes the job (each store's removal is idempotent). Returns how many."""
    if image_ids:
        ids = list(image_ids)
        c.index.remove_images(ids)
        c.features.remove_images(ids)
        c.occurrences.remove_images(ids)
        c.board.remove_images(ids)
        c.graph_state.remove_images(ids)
        c.catalog.remove_images(ids)
    return len(image_ids)


def remove_paths(c: Context, paths: Sequence[str | Path]) -> dict:
    """``memetrace remove``: forget these files or URLs (a folder: every file indexed below it);
    the images no file shows any more leave every store and their clusters. Returns the summary,
    with the arguments that named nothing indexed under ``not_indexed``."""
    batch, state = open_stores(c)
    keys = set(batch.files()) | {p for p, _, _ in batch.bad_files()}
    gone: set[str] = set()
    not_indexed = []
    for given in paths:
        found = _named(str(given), keys)
        gone |= found
        if not found:
            not_indexed.append(str(given))
    return {**_drop(c, batch, state, sorted(gone)), "not_indexed": not_indexed}


def prune(c: Context) -> dict:
    """``memetrace prune``: forget the indexed files, and bad files, that no longer exist."""
    batch, state = open_stores(c)
    gone = missing_files(batch.files(), ())
    gone += [p for p, _, _ in batch.bad_files() if not is_url(p) and not os.path.lexists(p)]
    return _drop(c, batch, state, gone)


def _named(given: str, keys: Collection[str]) -> set[str]:
    """The indexed keys ``given`` names: itself (a URL, a file) or everything below it (a folder)."""
    if is_url(given):
        return {given} & set(keys)
    path = Path(given).expanduser().absolute()
    names = {path.as_posix(), Path(os.path.realpath(path)).as_posix()}
    below = tuple(n.rstrip("/") + "/" for n in names)
    return {k for k in keys if k in names or k.startswith(below)}


def _drop(c: Context, batch: BatchCatalog, state: GraphState, paths: Sequence[str]) -> dict:
    batch.remove_paths(paths)
    removed = forget_images(c, orphans(batch))
    if paths or removed:
        update_trees(state, c.features, c.trees,
                     recluster(state, c.settings.cluster_algorithm, publish=c.board.publish).touched,
                     verify=c.verify_pairs, cache=c.tree_edges)
    return {"removed_paths": len(paths), "removed_images": removed, **counts(c)}


#: what memetrace writes in a data dir (the stores' files with their SQLite and Milvus Lite side
#: files, the precision cache, exports, the demo corpus); a folder holding anything else is not reset
DATA_DIR_NAMES = frozenset({"features", "gallery", "demo-corpus", "precision.json", "clusters.csv", "clusters.json",
                            "parents.csv", "parents.json", "parents.graphml",
                            "clusters.parquet"})
DATA_DIR_PREFIXES = ("catalog.db", "cluster-state.db", "trees.db", "milvus.db", ".milvus.db", "milvus_lite")
#: one of these makes a folder a data dir
DATA_DIR_MARKS = ("catalog.db", "cluster-state.db", "milvus.db", "features")


def reset(c: Context) -> list[Path]:
    """``memetrace reset``: delete everything in the data dir and drop the collections of its
    Milvus Lite (a server of this process may still be serving them); returns what was deleted.
    A Milvus server or an S3 bucket is not touched. Refuses (ValueError, nothing deleted) a
    folder with no memetrace store or holding anything else, and one whose Milvus Lite another
    process serves. Use a new Context afterwards."""
    data_dir = c.settings.data_dir
    entries = sorted(data_dir.iterdir()) if data_dir.is_dir() else []
    if not entries:
        return []
    foreign = [e.name for e in entries if e.name not in DATA_DIR_NAMES and not e.name.startswith(DATA_DIR_PREFIXES)]
    if foreign or not any((data_dir / m).exists() for m in DATA_DIR_MARKS):
        held = f"it also holds {', '.join(foreign[:5])}" if foreign else "it holds no memetrace store"
        raise ValueError(f"{data_dir} does not look like a memetrace data dir ({held}): nothing deleted; "
                         "check --data-dir / MEMETRACE_DATA_DIR, or delete it yourself")
    uri = c.settings.resolved_milvus_uri()
    if "://" not in uri and (host := other_host(Path(uri))):  # deleting its folder would break it
        raise ValueError(f"{uri} is in use by {host}: stop it, then run reset again; nothing deleted")
    if "://" not in uri and Path(uri).exists():
        prefix = c.milvus_config.collection_prefix + "_"
        for name in c.milvus.list_collections():
            if name.startswith(prefix):
                c.milvus.drop_collection(name)
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()
    return entries


def record(batch: BatchCatalog, outcomes: list[Outcome], root_of: dict[str, int], items: dict[str, InputItem],
           known: Collection[str]) -> None:
    """The batch's record of indexed inputs: each stored file's path, image, root, size and mtime;
    each refused one's reason (a known file now refused no longer shows its old image)."""
    from memetrace.ingest.indexer import Stored, Unindexable

    stored = [o for o in outcomes if isinstance(o, Stored)]
    bad = [o for o in outcomes if isinstance(o, Unindexable)]
    batch.add_images((o.image_id, o.nb_points) for o in stored)
    batch.add_paths(PathRow(o.key, o.image_id, root_of.get(o.key), items[o.key].size, items[o.key].mtime_ns)
                    for o in stored)
    batch.remove_paths(o.key for o in bad if o.key in known)
    batch.add_bad((o.key, o.reason, o.detail, root_of.get(o.key)) for o in bad)


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


def index_notes(c: Context, summary: dict, shown: int = 5) -> list[str]:
    """What ``index`` tells after its summary (on stderr): the first bad files with their reasons,
    and how many indexed files disappeared."""
    notes = []
    bad = bad_file_rows(c.catalog)
    if bad:
        notes.append(f"{len(bad)} bad file{'s' if len(bad) > 1 else ''}, not indexed:")
        notes += [f"  {path}: {reason}" + (f" ({detail})" if detail else "") for path, reason, detail in bad[:shown]]
        notes.append("memetrace bad-files lists all" + ("" if len(bad) > shown else " (with --csv: as CSV)"))
    few = few_keypoint_paths(c) if summary.get("few_keypoints") else []
    if few:
        notes.append(f"{len(few)} file{'s have' if len(few) > 1 else ' has'} fewer than "
                     f"{c.settings.low_texture_points} keypoints (smooth pictures), matched only as near-exact copies:")
        notes += [f"  {p}" for p in few[:shown]]
        notes.append("memetrace stats lists the first 10 (few_keypoint_paths)")
    n = summary.get("missing_files", 0)
    if n:
        notes.append(f"{n} file{'s are' if n > 1 else ' is'} missing: run memetrace prune")
    return notes
