"""The catalog: what a run needs beyond vectors, in one SQLite file.

Tables: ``paths`` (every file or post seen, and the image it decoded to: exact duplicates share
an image), ``images`` (per image: keypoint count, whether it has been matched yet),
``bad_files`` (what could not be indexed and why), ``matches`` (verified edges, a < b) and
``clusters`` (the last cluster assignment), ``meta`` (e.g. the folder paths are relative to).
The clusterer service keeps its state here too: ``posts`` (occurrences learnt from the images
topic) and ``cluster_events`` (each cluster's history: created, grew, merged, split...).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from memetrace.models import Match

SCHEMA = """
CREATE TABLE IF NOT EXISTS paths (path TEXT PRIMARY KEY, image_id INTEGER NOT NULL, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS paths_image ON paths(image_id);
CREATE TABLE IF NOT EXISTS images (image_id INTEGER PRIMARY KEY, nb_points INTEGER NOT NULL,
    matched INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bad_files (path TEXT PRIMARY KEY, reason TEXT NOT NULL, detail TEXT NOT NULL,
    seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS matches (a INTEGER NOT NULL, b INTEGER NOT NULL,
    inliers INTEGER NOT NULL, kind TEXT NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS clusters (image_id INTEGER PRIMARY KEY, cluster_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS posts (post_id TEXT PRIMARY KEY, image_id INTEGER NOT NULL, posted_at INTEGER NOT NULL,
    platform TEXT NOT NULL, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS posts_image ON posts(image_id);
CREATE TABLE IF NOT EXISTS cluster_events (at INTEGER NOT NULL, event TEXT NOT NULL, cluster_id INTEGER NOT NULL,
    clusters TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS cluster_events_cluster ON cluster_events(cluster_id);
"""




class Catalog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, rows: Iterable[Sequence]) -> None:
        rows = list(rows)
        if not rows:  # most chunks have no bad files, no re-found images: skip the transaction
            return
        with self._lock:
            self.db.execute("BEGIN")
            self.db.executemany(sql, rows)
            self.db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    # paths and images
    def indexed_paths(self) -> set[str]:
        """Paths already indexed (bad files are not: they are read again, they may be fixed)."""
        return {r[0] for r in self._read("SELECT path FROM paths")}

    def add_paths(self, pairs: Iterable[tuple[str, int]]) -> None:
        pairs = list(pairs)
        now = time.time()
        self._write("INSERT OR REPLACE INTO paths VALUES (?, ?, ?)", [(p, i, now) for p, i in pairs])
        self._write("DELETE FROM bad_files WHERE path = ?", [(p,) for p, _ in pairs])

    def add_images(self, rows: Iterable[tuple[int, int]], matched: bool = False) -> None:
        """(image_id, nb_points); an image already there keeps its matched flag.

        ``matched``: the matcher service handles these (streaming), batch runs must not redo them."""
        self._write("INSERT OR IGNORE INTO images (image_id, nb_points, matched) VALUES (?, ?, ?)",
                    [(i, n, int(matched)) for i, n in rows])

    def images(self) -> dict[int, int]:
        return dict(self._read("SELECT image_id, nb_points FROM images"))

    def unmatched(self) -> list[int]:
        return [r[0] for r in self._read("SELECT image_id FROM images WHERE matched = 0 ORDER BY image_id")]

    def mark_matched(self, image_ids: Iterable[int]) -> None:
        self._write("UPDATE images SET matched = 1 WHERE image_id = ?", [(i,) for i in image_ids])

    def paths_by_image(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for path, image_id in self._read("SELECT path, image_id FROM paths ORDER BY path"):
            out.setdefault(image_id, []).append(path)
        return out

    # bad files
    def add_bad(self, rows: Iterable[tuple[str, str, str]]) -> None:
        now = time.time()
        self._write("INSERT OR REPLACE INTO bad_files VALUES (?, ?, ?, ?)", [(p, r, d, now) for p, r, d in rows])

    def bad_files(self) -> list[tuple[str, str, str]]:
        return self._read("SELECT path, reason, detail FROM bad_files ORDER BY path")

    # matches
    def add_matches(self, matches: Iterable[Match]) -> None:
        self._write("INSERT OR REPLACE INTO matches VALUES (?, ?, ?, ?)",
                    [(min(m.a, m.b), max(m.a, m.b), m.inliers, m.kind) for m in matches])

    def matches(self) -> list[Match]:
        return [Match(*r) for r in self._read("SELECT a, b, inliers, kind FROM matches")]

    def matches_of(self, image_id: int) -> list[Match]:
        return [Match(*r) for r in self._read(
            "SELECT a, b, inliers, kind FROM matches WHERE a = ? OR b = ?", (image_id, image_id))]

    # clusters
    def set_clusters(self, assignment: dict[int, int], at: int = 0,
                     events: Iterable[tuple[str, int, Sequence[int]]] = ()) -> None:
        """Replace the assignment and record the run's history ``events`` (event, cluster_id, related
        cluster ids) at ``at`` (unix s) in one transaction: a run that fails before this records no
        event, so the run redoing it does not record them twice."""
        with self._lock:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM clusters")
            self.db.executemany("INSERT INTO clusters VALUES (?, ?)", assignment.items())
            self.db.executemany("INSERT INTO cluster_events VALUES (?, ?, ?, ?)",
                                [(at, e, c, json.dumps(list(related))) for e, c, related in events])
            self.db.execute("COMMIT")

    def clusters(self) -> dict[int, int]:
        return dict(self._read("SELECT image_id, cluster_id FROM clusters"))

    # posts (streaming occurrences) and cluster history
    def add_posts(self, rows: Iterable[tuple[str, int, int, str]]) -> None:
        """(post_id, image_id, posted_at unix s or -1, platform); a redelivered post keeps its first row."""
        now = time.time()
        self._write("INSERT OR IGNORE INTO posts VALUES (?, ?, ?, ?, ?)", [(*r, now) for r in rows])

    def occurrence_stats(self, now: float) -> list[tuple[int, str, int, int, int, int, int]]:
        """Per (image, platform): posts, first and last seen, posts in the last hour and day.

        Posts and indexed files both count (a file is an occurrence on platform "file"); a post's
        time is when it was posted, or when the clusterer first saw it if unknown or later (a
        post dated in the future would otherwise count as growth, and as last seen, for ever)."""
        return self._read(
            "SELECT image_id, platform, COUNT(*), MIN(t), MAX(t), SUM(t >= ?), SUM(t >= ?) FROM ("
            " SELECT image_id, platform, CASE WHEN posted_at >= 0 THEN MIN(posted_at, CAST(seen_at AS INTEGER))"
            " ELSE CAST(seen_at AS INTEGER) END t"
            " FROM posts UNION ALL SELECT image_id, 'file', CAST(seen_at AS INTEGER) FROM paths)"
            " GROUP BY image_id, platform", (int(now - 3600), int(now - 86400)))

    def cluster_histories(self, limit: int = 20) -> dict[int, list[dict]]:
        """cluster id -> its latest ``limit`` events, oldest first (one query for every cluster)."""
        rows = self._read(
            "SELECT cluster_id, at, event, clusters FROM (SELECT *, rowid AS seq, ROW_NUMBER() OVER (PARTITION BY "
            "cluster_id ORDER BY rowid DESC) AS n FROM cluster_events) WHERE n <= ? ORDER BY cluster_id, seq", (limit,))
        out: dict[int, list[dict]] = {}
        for cid, at, e, c in rows:
            out.setdefault(cid, []).append({"at": at, "event": e, "clusters": json.loads(c)})
        return out

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(key, value)])

    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def counts(self) -> dict[str, int]:
        q = {"images": "SELECT COUNT(*) FROM images", "paths": "SELECT COUNT(*) FROM paths",
             "bad_files": "SELECT COUNT(*) FROM bad_files", "matches": "SELECT COUNT(*) FROM matches",
             "clusters": "SELECT COUNT(*) FROM (SELECT cluster_id FROM clusters GROUP BY cluster_id "
                                 "HAVING COUNT(*) > 1)"}
        return {k: int(self._read(sql)[0][0]) for k, sql in q.items()}
