"""The batch pipeline's own record (``memetrace index``), behind :class:`BatchCatalog`::

    paths      every file or URL indexed -> the image it decoded to (exact duplicates share one)
    images     per image: nb_points, and whether this batch already matched it and fed it to the clusterer
    bad_files  what could not be indexed and why (read again by the next run: it may be fixed)
    meta       e.g. ``root``, the folder the paths are shown relative to

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

from memetrace.sqlite_file import FileFormat, SqliteStore


class BatchCatalog(ABC):
    @abstractmethod
    def indexed_paths(self) -> set[str]:
        """Paths already indexed (bad files are not: they are read again, they may be fixed)."""

    @abstractmethod
    def add_paths(self, pairs: Iterable[tuple[str, int]]) -> None:
        """(path, image_id); a path now indexed is no longer a bad file."""

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
    def add_bad(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """(path, reason, detail); a path seen bad again keeps one row."""

    @abstractmethod
    def bad_files(self) -> list[tuple[str, str, str]]:
        """(path, reason, detail), by path."""

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    @abstractmethod
    def meta(self, key: str) -> str | None: ...

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """images, paths, bad_files."""

    def close(self) -> None:
        """Release the backend (nothing for the in-memory one)."""


class MemoryBatchCatalog(BatchCatalog):
    def __init__(self) -> None:
        self._paths: dict[str, int] = {}
        self._images: dict[int, int] = {}
        self._matched: set[int] = set()
        self._bad: dict[str, tuple[str, str, str]] = {}
        self._meta: dict[str, str] = {}

    def indexed_paths(self) -> set[str]:
        return set(self._paths)

    def add_paths(self, pairs: Iterable[tuple[str, int]]) -> None:
        for path, image_id in pairs:
            self._paths[path] = image_id
            self._bad.pop(path, None)

    def paths_by_image(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for path in sorted(self._paths):
            out.setdefault(self._paths[path], []).append(path)
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

    def add_bad(self, rows: Iterable[tuple[str, str, str]]) -> None:
        self._bad.update((r[0], r) for r in rows)

    def bad_files(self) -> list[tuple[str, str, str]]:
        return [self._bad[p] for p in sorted(self._bad)]

    def set_meta(self, key: str, value: str) -> None:
        self._meta[key] = value

    def meta(self, key: str) -> str | None:
        return self._meta.get(key)

    def counts(self) -> dict[str, int]:
        return {"images": len(self._images), "paths": len(self._paths), "bad_files": len(self._bad)}


FORMAT = FileFormat(
    application_id=0x4D544243,  # "MTBC": memetrace batch catalog
    version=1,
    what="batch catalog",
    fix="delete it and run `memetrace index` again (images already stored are not embedded again)",
    schema="""
CREATE TABLE IF NOT EXISTS paths (path TEXT PRIMARY KEY, image_id INTEGER NOT NULL, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS paths_image ON paths(image_id);
CREATE TABLE IF NOT EXISTS images (image_id INTEGER PRIMARY KEY, nb_points INTEGER NOT NULL,
    matched INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bad_files (path TEXT PRIMARY KEY, reason TEXT NOT NULL, detail TEXT NOT NULL,
    seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""")


class SqliteBatchCatalog(SqliteStore, BatchCatalog):
    FORMAT = FORMAT

    def indexed_paths(self) -> set[str]:
        return {r[0] for r in self.file.read("SELECT path FROM paths")}

    def add_paths(self, pairs: Iterable[tuple[str, int]]) -> None:
        pairs = list(pairs)
        now = time.time()
        self.file.transaction([("INSERT OR REPLACE INTO paths VALUES (?, ?, ?)", [(p, i, now) for p, i in pairs]),
                               ("DELETE FROM bad_files WHERE path = ?", [(p,) for p, _ in pairs])])

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

    def add_bad(self, rows: Iterable[tuple[str, str, str]]) -> None:
        now = time.time()
        self.file.write("INSERT OR REPLACE INTO bad_files VALUES (?, ?, ?, ?)", [(p, r, d, now) for p, r, d in rows])

    def bad_files(self) -> list[tuple[str, str, str]]:
        return self.file.read("SELECT path, reason, detail FROM bad_files ORDER BY path")

    def set_meta(self, key: str, value: str) -> None:
        self.file.write("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(key, value)])

    def meta(self, key: str) -> str | None:
        rows = self.file.read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def counts(self) -> dict[str, int]:
        q = {"images": "SELECT COUNT(*) FROM images", "paths": "SELECT COUNT(*) FROM paths",
             "bad_files": "SELECT COUNT(*) FROM bad_files"}
        return self._counts(q)
