"""The batch pipeline's own record (``memetrace index``), behind :class:`BatchCatalog`::

    roots      every folder a path was indexed from (a folder named to ``index``, an image's or a
               list file's folder): each path is shown relative to its own root, whatever was indexed later
    paths      every file or URL indexed -> the image it decoded to (exact duplicates share one), its
               root, and the file's size and mtime when read (a file changed in place is read again)
    images     per image: nb_points, and whether this batch already matched it and fed it to the clusterer
    bad_files  what could not be indexed and why, with its root (read again by the next run: it may be fixed)

The clusterer's data (images, matches, occurrences, clusters, history) is not here: ``run_index``
feeds the clusterer's :class:`~memetrace.clusterer.state.GraphState` explicitly.

Two files, not one: ``DATA_DIR/catalog.db`` (this) and the clusterer state (``cluster_state_path``,
default ``DATA_DIR/cluster-state.db``). Each store then owns a whole file and its format version
(an old or foreign file is refused on its own, and one store is reset without touching the
other), the streaming clusterer's file holds no batch tables, and no two connections of one
process contend for one SQLite write lock. Consistency across the two needs no shared
transaction: an image is marked matched only once the state has it, its edges and its files, and
an image the state lacks (its file was deleted) is matched and fed again by the next run.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import NamedTuple

from memetrace.sqlite_file import FileFormat, SqliteStore


class PathRow(NamedTuple):
    """An indexed path; ``root_id`` None: a URL (shown as is); size/mtime -1: not a local file."""

    path: str
    image_id: int
    root_id: int | None = None
    size: int = -1
    mtime_ns: int = -1


class BatchCatalog(ABC):
    @abstractmethod
    def add_root(self, path: str) -> int:
        """The id of this root folder, added if new."""

    @abstractmethod
    def roots(self) -> dict[int, str]:
        """root id -> folder."""

    @abstractmethod
    def path_roots(self) -> dict[str, int]:
        """path -> its root id, for the indexed paths and bad files that have one."""

    @abstractmethod
    def indexed_paths(self) -> set[str]:
        """Paths already indexed (bad files are not: they are read again, they may be fixed)."""

    @abstractmethod
    def add_paths(self, rows: Iterable[tuple]) -> None:
        """:class:`PathRow` tuples (``(path, image_id)`` at least); a path indexed again is replaced,
        and a path now indexed is no longer a bad file."""

    @abstractmethod
    def files(self) -> dict[str, PathRow]:
        """path -> its row."""

    @abstractmethod
    def remove_paths(self, paths: Iterable[str]) -> None:
        """Forget these paths, indexed or bad (their images stay: :meth:`remove_images`)."""

    @abstractmethod
    def remove_images(self, image_ids: Iterable[int]) -> None:
        """Forget these images and every path showing them."""

    @abstractmethod
    def paths_by_image(self) -> dict[int, list[str]]:
        """image id -> its paths, sorted."""

    @abstractmethod
    def add_images(self, rows: Iterable[tuple[int, int]]) -> None:
        """(image_id, nb_points), not matched yet; an image already there keeps its row and flag."""

    @abstractmethod
    def images(self) -> dict[int, int]:
        """image id -> nb_points."""

    @abstractmethod
    def unmatched(self) -> list[int]:
        """Images not matched by a batch run yet, in id order."""

    @abstractmethod
    def mark_matched(self, image_ids: Iterable[int]) -> None: ...

    @abstractmethod
    def add_bad(self, rows: Iterable[tuple]) -> None:
        """(path, reason, detail[, root_id]); a path seen bad again keeps one row."""

    @abstractmethod
    def bad_files(self) -> list[tuple[str, str, str]]:
        """(path, reason, detail), by path."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """images, paths, bad_files."""

    def close(self) -> None:
        """Release the backend (nothing for the in-memory one)."""


class MemoryBatchCatalog(BatchCatalog):
    def __init__(self) -> None:
        self._roots: dict[str, int] = {}
        self._paths: dict[str, PathRow] = {}
        self._images: dict[int, int] = {}
        self._matched: set[int] = set()
        self._bad: dict[str, tuple[str, str, str, int | None]] = {}

    def add_root(self, path: str) -> int:
        return self._roots.setdefault(path, len(self._roots) + 1)

    def roots(self) -> dict[int, str]:
        return {i: p for p, i in self._roots.items()}

    def path_roots(self) -> dict[str, int]:
        bad = {p: b[3] for p, b in self._bad.items() if b[3] is not None}
        return {**bad, **{p: r.root_id for p, r in self._paths.items() if r.root_id is not None}}

    def indexed_paths(self) -> set[str]:
        return set(self._paths)

    def add_paths(self, rows: Iterable[tuple]) -> None:
        for row in map(_path_row, rows):
            self._paths[row.path] = row
            self._bad.pop(row.path, None)

    def files(self) -> dict[str, PathRow]:
        return dict(self._paths)

    def remove_paths(self, paths: Iterable[str]) -> None:
        for p in paths:
            self._paths.pop(p, None)
            self._bad.pop(p, None)

    def remove_images(self, image_ids: Iterable[int]) -> None:
        gone = set(image_ids)
        self._paths = {p: r for p, r in self._paths.items() if r.image_id not in gone}
        for i in gone:
            self._images.pop(i, None)
            self._matched.discard(i)

    def paths_by_image(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for path in sorted(self._paths):
            out.setdefault(self._paths[path].image_id, []).append(path)
        return out

    def add_images(self, rows: Iterable[tuple[int, int]]) -> None:
        for image_id, nb_points in rows:
            self._images.setdefault(image_id, nb_points)

    def images(self) -> dict[int, int]:
        return dict(self._images)

    def unmatched(self) -> list[int]:
        return sorted(set(self._images) - self._matched)

    def mark_matched(self, image_ids: Iterable[int]) -> None:
        self._matched.update(i for i in image_ids if i in self._images)

    def add_bad(self, rows: Iterable[tuple]) -> None:
        self._bad.update((r[0], _bad_row(r)) for r in rows)

    def bad_files(self) -> list[tuple[str, str, str]]:
        return [self._bad[p][:3] for p in sorted(self._bad)]

    def counts(self) -> dict[str, int]:
        return {"images": len(self._images), "paths": len(self._paths), "bad_files": len(self._bad)}


def _path_row(row: tuple) -> PathRow:
    return row if isinstance(row, PathRow) else PathRow(*row)


def _bad_row(row: tuple) -> tuple[str, str, str, int | None]:
    path, reason, detail, *root = row
    return path, reason, detail, root[0] if root else None


FORMAT = FileFormat(
    application_id=0x4D544243,  # "MTBC": memetrace batch catalog
    version=2,  # 2: roots, a root per path and bad file, file size and mtime per path
    what="batch catalog",
    fix="delete it and run `memetrace index` again (images already stored are not embedded again)",
    schema="""
CREATE TABLE IF NOT EXISTS roots (root_id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS paths (path TEXT PRIMARY KEY, image_id INTEGER NOT NULL, root_id INTEGER,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS paths_image ON paths(image_id);
CREATE TABLE IF NOT EXISTS images (image_id INTEGER PRIMARY KEY, nb_points INTEGER NOT NULL,
    matched INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bad_files (path TEXT PRIMARY KEY, reason TEXT NOT NULL, detail TEXT NOT NULL,
    root_id INTEGER, seen_at REAL NOT NULL)""")


class SqliteBatchCatalog(SqliteStore, BatchCatalog):
    FORMAT = FORMAT

    def add_root(self, path: str) -> int:
        self.file.write("INSERT OR IGNORE INTO roots (path) VALUES (?)", [(path,)])
        return int(self.file.read("SELECT root_id FROM roots WHERE path = ?", (path,))[0][0])

    def roots(self) -> dict[int, str]:
        return dict(self.file.read("SELECT root_id, path FROM roots"))

    def path_roots(self) -> dict[str, int]:
        return dict(self.file.read("SELECT path, root_id FROM bad_files WHERE root_id IS NOT NULL UNION ALL "
                                   "SELECT path, root_id FROM paths WHERE root_id IS NOT NULL"))

    def indexed_paths(self) -> set[str]:
        return {r[0] for r in self.file.read("SELECT path FROM paths")}

    def add_paths(self, rows: Iterable[tuple]) -> None:
        rows = [_path_row(r) for r in rows]
        now = time.time()
        self.file.transaction([("INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?, ?, ?)", [(*r, now) for r in rows]),
                               ("DELETE FROM bad_files WHERE path = ?", [(r.path,) for r in rows])])

    def files(self) -> dict[str, PathRow]:
        rows = self.file.read("SELECT path, image_id, root_id, size, mtime_ns FROM paths")
        return {r[0]: PathRow(*r) for r in rows}

    def remove_paths(self, paths: Iterable[str]) -> None:
        rows = [(p,) for p in paths]
        self.file.transaction([("DELETE FROM paths WHERE path = ?", rows), ("DELETE FROM bad_files WHERE path = ?", rows)])

    def remove_images(self, image_ids: Iterable[int]) -> None:
        rows = [(i,) for i in image_ids]
        self.file.transaction([("DELETE FROM paths WHERE image_id = ?", rows),
                               ("DELETE FROM images WHERE image_id = ?", rows)])

    def paths_by_image(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for path, image_id in self.file.read("SELECT path, image_id FROM paths ORDER BY path"):
            out.setdefault(image_id, []).append(path)
        return out

    def add_images(self, rows: Iterable[tuple[int, int]]) -> None:
        self.file.write("INSERT OR IGNORE INTO images (image_id, nb_points) VALUES (?, ?)", rows)

    def images(self) -> dict[int, int]:
        return dict(self.file.read("SELECT image_id, nb_points FROM images"))

    def unmatched(self) -> list[int]:
        return [r[0] for r in self.file.read("SELECT image_id FROM images WHERE matched = 0 ORDER BY image_id")]

    def mark_matched(self, image_ids: Iterable[int]) -> None:
        self.file.write("UPDATE images SET matched = 1 WHERE image_id = ?", [(i,) for i in image_ids])

    def add_bad(self, rows: Iterable[tuple]) -> None:
        now = time.time()
        self.file.write("INSERT OR REPLACE INTO bad_files VALUES (?, ?, ?, ?, ?)",
                        [(*_bad_row(r), now) for r in rows])

    def bad_files(self) -> list[tuple[str, str, str]]:
        return self.file.read("SELECT path, reason, detail FROM bad_files ORDER BY path")

    def counts(self) -> dict[str, int]:
        q = {"images": "SELECT COUNT(*) FROM images", "paths": "SELECT COUNT(*) FROM paths",
             "bad_files": "SELECT COUNT(*) FROM bad_files"}
        return self._counts(q)
