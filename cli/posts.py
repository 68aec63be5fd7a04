"""Post metadata for folders (``memetrace index DIR --posts POSTS.csv``).

A CSV with the columns ``path, post_id, posted_at, platform, author`` (any other column is kept
as the post's ``meta``: its non-empty cells, cut as the stores keep them,
:func:`memetrace.occurrence_log.fitted_occurrence`) says which post showed which file. A column
without a name, or named like an earlier extra column, is left out and named in the report; a
required column named twice stops the run (which is the post id?). ``path`` is relative to the CSV's
folder, or absolute; ``posted_at`` is ISO 8601 (naive = UTC) or epoch seconds, empty = unknown.
The posts are recorded as the streaming ingest records them: as occurrences in the occurrence log
(with the author) and in the clusterer's state (the times and platforms that timelines, growth and
derivation trees read). Rows naming a file the batch did not index are reported, not fatal.

Also the rows of ``memetrace tree`` (:func:`tree_table`): the trees of a folder's clusters, with
each image's earliest post (meta included) from the occurrence log.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from memetrace.cli.context import Context
from memetrace.clusterer.state import GraphState
from memetrace.clusterer.tree_export import TreeRow, tree_rows
from memetrace.clusterer.tree_update import current_trees, first_posts
from memetrace.messages import AUTHOR_BYTES, PLATFORM_BYTES, POST_ID_BYTES, URL_BYTES, occurrence_key
from memetrace.models import OccurrenceRow
from memetrace.occurrence_log import OccurrenceLog
from memetrace.tree_store import earliest_posts
from memetrace.varchar import cut_utf8

REQUIRED = ("path", "post_id", "posted_at", "platform", "author")
EXAMPLES = 5  # unknown files named in the report


class PostsFileError(ValueError):
    """The posts CSV cannot be read at all (a row that cannot be used is counted, not raised)."""


@dataclass(frozen=True)
class CsvPost:
    path: str  # absolute, as the batch keys files
    post_id: str
    posted_at: int  # unix s, -1 = unknown
    platform: str
    author: str
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class PostsReport:
    rows: int = 0
    recorded: int = 0
    bad_rows: int = 0  # no post id, or a time that is neither ISO 8601 nor epoch seconds
    unknown_files: int = 0
    unknown_examples: list[str] = field(default_factory=list)
    bad_examples: list[str] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)  # unnamed, or an extra column's name again

    def as_dict(self) -> dict:
        return {"rows": self.rows, "recorded": self.recorded, "bad_rows": self.bad_rows,
                "bad_examples": self.bad_examples, "unknown_files": self.unknown_files,
                "unknown_examples": self.unknown_examples, "ignored_columns": self.ignored_columns}


def parse_time(text: str) -> int:
    """Unix seconds of an ISO 8601 time or of epoch seconds; -1 when empty. ValueError otherwise."""
    text = text.strip()
    if not text:
        return -1
    try:
        t = float(text)
    except ValueError:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        t = dt.replace(tzinfo=dt.tzinfo or timezone.utc).timestamp()
    if not 0 <= t < 2**40:
        raise ValueError(f"time out of range: {text!r}")
    return int(t)


def read_posts(csv_path: Path, report: PostsReport) -> list[CsvPost]:
    """The usable rows of ``csv_path``; unusable ones are counted in ``report``."""
    base = csv_path.resolve().parent
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            columns = _columns(csv_path, next(reader, []), report)
            return [p for p in (_row(dict(_cells(columns, r)), base, report) for r in reader if r) if p is not None]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PostsFileError(f"{csv_path}: cannot read the posts CSV ({exc}); give a UTF-8 CSV file") from exc


def _columns(csv_path: Path, header: list[str], report: PostsReport) -> dict[str, int]:
    """Column name -> its position: the required ones, then each extra name's first column."""
    names = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise PostsFileError(f"{csv_path}: missing column(s) {', '.join(missing)} "
                             f"(a posts CSV needs {', '.join(REQUIRED)})")
    if twice := [c for c in REQUIRED if names.count(c) > 1]:
        raise PostsFileError(f"{csv_path}: column(s) {', '.join(twice)} named more than once; keep one of each")
    columns: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name or name in columns:
            report.ignored_columns.append(f"{name or '(no name)'} (column {i + 1})")
        else:
            columns[name] = i
    return columns


def _cells(columns: Mapping[str, int], row: list[str]) -> Iterable[tuple[str, str]]:
    return ((name, row[i]) for name, i in columns.items() if i < len(row))


def _row(r: Mapping[str, str], base: Path, report: PostsReport) -> CsvPost | None:
    report.rows += 1
    path, post_id = r.get("path", "").strip(), r.get("post_id", "").strip()
    try:
        if not path or not post_id or len(post_id.encode()) > POST_ID_BYTES:
            raise ValueError("needs a path and a post_id")
        posted_at = parse_time(r.get("posted_at", ""))
    except ValueError as exc:
        report.bad_rows += 1
        if len(report.bad_examples) < EXAMPLES:
            report.bad_examples.append(f"row {report.rows}: {exc}")
        return None
    meta = {k: v.strip() for k, v in r.items() if k not in REQUIRED and v.strip()}
    return CsvPost(os.path.normpath(base / path), post_id, posted_at,
                   cut_utf8(r.get("platform", "").strip(), PLATFORM_BYTES),
                   cut_utf8(r.get("author", "").strip(), AUTHOR_BYTES), meta)


def record_posts(posts: Iterable[CsvPost], image_of: Mapping[str, int], state: GraphState,
                 occurrences: OccurrenceLog | None, report: PostsReport) -> None:
    """Each post of a known file as an occurrence (idempotent: keyed by post id); ``image_of``:
    indexed path -> image id (paths compared normalised and with links resolved)."""
    known = {os.path.normpath(p): i for p, i in image_of.items()}
    known.update({os.path.realpath(p): i for p, i in image_of.items()})
    rows: list[OccurrenceRow] = []
    for p in posts:
        image_id = known.get(p.path, known.get(os.path.realpath(p.path)))
        if image_id is None:
            report.unknown_files += 1
            if len(report.unknown_examples) < EXAMPLES:
                report.unknown_examples.append(p.path)
            continue
        rows.append(OccurrenceRow(occurrence_key(p.post_id), image_id, p.post_id, cut_utf8(p.path, URL_BYTES),
                                  p.posted_at, p.platform, p.author, meta=p.meta))
    state.add_posts((r.post_id, r.image_id, r.posted_at, r.platform) for r in rows)
    if occurrences is not None and rows:
        occurrences.add_occurrences(rows)
    report.recorded += len(rows)


def tree_table(c: Context) -> list[TreeRow]:
    """Every cluster's derivation tree as rows (paths as indexed): those stored, missing ones rebuilt."""
    trees = current_trees(c.graph_state, c.features, c.trees, verify=c.verify_pairs, cache=c.tree_edges)
    members = sorted({d.image_id for tree in trees.values() for d in tree})
    paths = {i: ps[0] for i, ps in c.catalog.paths_by_image().items() if ps}
    # no tree, no Milvus opened (nor created in an empty data dir)
    posts = earliest_posts(c.occurrences.occurrences_of(members)) if members else {}
    return tree_rows(trees, paths, first_posts(c.graph_state, members), posts)
