"""The clusterer's own data, behind :class:`GraphState`: what it was told, and what it decided.

Inputs (written by whoever feeds the clusterer: the clusterer service from the Kafka topics, the
batch pipeline from its run; every write is idempotent, so a redelivered batch changes nothing)::

    images   (image_id, nb_points)                         first row kept
    matches  (a < b, inliers, kind)                         keyed by pair, the last one wins
    posts    (post_id, image_id, posted_at, platform, seen_at)  occurrences: posts, files ("file")

Decisions (written by ``recluster`` once a run is published)::

    clusters        image -> cluster id, the last run's assignment
    cluster_events  each cluster's history: created, grew, shrank, merged, split, dissolved

Backends: :class:`SqliteGraphState` (one file, ``cluster_state_path``, with one writer: the
clusterer service, or the batch pipeline) and :class:`MemoryGraphState` (tests).

Towards incremental clustering: a run already writes only the assignments that changed
(:meth:`GraphState.save_run`); a run that also reads only what changed needs a change cursor on
images and matches (a schema version bump, which the file format check makes safe) and reads by
image (clusters of some images, occurrences of some images): more methods on this interface, no
new store.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from memetrace.models import Match
from memetrace.sqlite_file import FileFormat, SqliteStore

#: (post_id, image_id, posted_at unix s or -1 = unknown, platform)
Post = tuple[str, int, int, str]
#: (event, cluster_id, related cluster ids): ClusterEvent.as_row()
EventRow = tuple[str, int, Sequence[int]]


class OccurrenceStats(NamedTuple):
    """Occurrences of one image on one platform."""
    image_id: int
    platform: str
    posts: int
    first: int  # unix s
    last: int
    hour: int  # in the hour before ``now``
    day: int


class GraphState(ABC):
    @abstractmethod
    def add_images(self, rows: Iterable[tuple[int, int]]) -> None:
        """(image_id, nb_points); an image already there keeps its row."""

    @abstractmethod
    def add_matches(self, matches: Iterable[Match]) -> None:
        """Verified edges, keyed by pair in either order: a pair seen again replaces its edge."""

    @abstractmethod
    def add_posts(self, rows: Iterable[Post]) -> None:
        """Occurrences; a redelivered post keeps its first row (and when it was first seen)."""

    @abstractmethod
    def images(self) -> dict[int, int]:
        """image id -> nb_points."""

    @abstractmethod
    def matches(self) -> list[Match]:
        """Every edge, a < b."""

    @abstractmethod
    def clusters(self) -> dict[int, int]:
        """image id -> cluster id, as the last saved run left them."""

    @abstractmethod
    def save_run(self, changed: dict[int, int], at: int, events: Iterable[EventRow] = ()) -> None:
        """Set the cluster of the ``changed`` images (the others keep theirs) and record the run's
        history ``events`` at ``at`` (unix s), all or nothing: a run that fails before this records
        no event, so the run redoing it does not record them twice."""

    @abstractmethod
    def occurrence_stats(self, now: float) -> list[OccurrenceStats]:
        """Per (image, platform): posts, first and last seen, posts in the last hour and day.

        A post's time is when it was posted, or when the state first saw it if unknown or later (a
        post dated in the future would otherwise count as growth, and as last seen, for ever)."""

    @abstractmethod
    def cluster_histories(self, limit: int = 20) -> dict[int, list[dict]]:
        """cluster id -> its latest ``limit`` events ({"at", "event", "clusters"}), oldest first."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """images, matches, and clusters of 2+ images."""

    def close(self) -> None:
        """Release the backend (nothing for the in-memory one)."""


def _post_time(posted_at: int, seen_at: float) -> int:
    return min(posted_at, int(seen_at)) if posted_at >= 0 else int(seen_at)


class MemoryGraphState(GraphState):
    def __init__(self) -> None:
        self._images: dict[int, int] = {}
        self._matches: dict[tuple[int, int], Match] = {}
        self._posts: dict[str, tuple[int, int, str, float]] = {}
        self._clusters: dict[int, int] = {}
        self._events: list[tuple[int, str, int, list[int]]] = []

    def add_images(self, rows: Iterable[tuple[int, int]]) -> None:
        for image_id, nb_points in rows:
            self._images.setdefault(image_id, nb_points)

    def add_matches(self, matches: Iterable[Match]) -> None:
        for m in matches:
            a, b = min(m.a, m.b), max(m.a, m.b)
            self._matches[a, b] = Match(a, b, m.inliers, m.kind)

    def add_posts(self, rows: Iterable[Post]) -> None:
        now = time.time()
        for post_id, image_id, posted_at, platform in rows:
            self._posts.setdefault(post_id, (image_id, posted_at, platform, now))

    def images(self) -> dict[int, int]:
        return dict(self._images)

    def matches(self) -> list[Match]:
        return list(self._matches.values())

    def clusters(self) -> dict[int, int]:
        return dict(self._clusters)

    def save_run(self, changed: dict[int, int], at: int, events: Iterable[EventRow] = ()) -> None:
        rows = [(at, e, c, list(related)) for e, c, related in events]  # read first: all or nothing
        self._clusters.update(changed)
        self._events += rows

    def occurrence_stats(self, now: float) -> list[OccurrenceStats]:
        times: dict[tuple[int, str], list[int]] = {}
        for image_id, posted_at, platform, seen_at in self._posts.values():
            times.setdefault((image_id, platform), []).append(_post_time(posted_at, seen_at))
        hour, day = int(now - 3600), int(now - 86400)
        return [OccurrenceStats(i, p, len(ts), min(ts), max(ts), sum(t >= hour for t in ts), sum(t >= day for t in ts))
                for (i, p), ts in times.items()]

    def cluster_histories(self, limit: int = 20) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for at, event, cid, related in self._events:
            out.setdefault(cid, []).append({"at": at, "event": event, "clusters": related})
        return {cid: events[-limit:] for cid, events in out.items()}

    def counts(self) -> dict[str, int]:
        sizes: dict[int, int] = {}
        for cid in self._clusters.values():
            sizes[cid] = sizes.get(cid, 0) + 1
        return {"images": len(self._images), "matches": len(self._matches),
                "clusters": sum(n > 1 for n in sizes.values())}


FORMAT = FileFormat(
    application_id=0x4D544753,  # "MTGS": memetrace graph state
    version=1,
    what="clusterer state",
    fix="delete it (batch: then run `memetrace index` again; the clusterer service: then replay the "
        "images and matches topics into it with a new MEMETRACE_KAFKA_CLUSTER_GROUP_ID)",
    schema="""
CREATE TABLE IF NOT EXISTS images (image_id INTEGER PRIMARY KEY, nb_points INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS matches (a INTEGER NOT NULL, b INTEGER NOT NULL, inliers INTEGER NOT NULL,
    kind TEXT NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS posts (post_id TEXT PRIMARY KEY, image_id INTEGER NOT NULL, posted_at INTEGER NOT NULL,
    platform TEXT NOT NULL, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS posts_image ON posts(image_id);
CREATE TABLE IF NOT EXISTS clusters (image_id INTEGER PRIMARY KEY, cluster_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cluster_events (at INTEGER NOT NULL, event TEXT NOT NULL, cluster_id INTEGER NOT NULL,
    clusters TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS cluster_events_cluster ON cluster_events(cluster_id)""")


class SqliteGraphState(SqliteStore, GraphState):
    FORMAT = FORMAT

    def add_images(self, rows: Iterable[tuple[int, int]]) -> None:
        self.file.write("INSERT OR IGNORE INTO images VALUES (?, ?)", rows)

    def add_matches(self, matches: Iterable[Match]) -> None:
        self.file.write("INSERT OR REPLACE INTO matches VALUES (?, ?, ?, ?)",
                        [(min(m.a, m.b), max(m.a, m.b), m.inliers, m.kind) for m in matches])

    def add_posts(self, rows: Iterable[Post]) -> None:
        now = time.time()
        self.file.write("INSERT OR IGNORE INTO posts VALUES (?, ?, ?, ?, ?)", [(*r, now) for r in rows])

    def images(self) -> dict[int, int]:
        return dict(self.file.read("SELECT image_id, nb_points FROM images"))

    def matches(self) -> list[Match]:
        return [Match(*r) for r in self.file.read("SELECT a, b, inliers, kind FROM matches")]

    def clusters(self) -> dict[int, int]:
        return dict(self.file.read("SELECT image_id, cluster_id FROM clusters"))

    def save_run(self, changed: dict[int, int], at: int, events: Iterable[EventRow] = ()) -> None:
        self.file.transaction([
            ("INSERT OR REPLACE INTO clusters VALUES (?, ?)", changed.items()),
            ("INSERT INTO cluster_events VALUES (?, ?, ?, ?)",
             [(at, e, c, json.dumps(list(related))) for e, c, related in events])])

    def occurrence_stats(self, now: float) -> list[OccurrenceStats]:
        rows = self.file.read(
            "SELECT image_id, platform, COUNT(*), MIN(t), MAX(t), SUM(t >= ?), SUM(t >= ?) FROM ("
            " SELECT image_id, platform, CASE WHEN posted_at >= 0 THEN MIN(posted_at, CAST(seen_at AS INTEGER))"
            " ELSE CAST(seen_at AS INTEGER) END t FROM posts) GROUP BY image_id, platform",
            (int(now - 3600), int(now - 86400)))
        return [OccurrenceStats(*r) for r in rows]

    def cluster_histories(self, limit: int = 20) -> dict[int, list[dict]]:
        rows = self.file.read(  # one query for every cluster
            "SELECT cluster_id, at, event, clusters FROM (SELECT *, rowid AS seq, ROW_NUMBER() OVER (PARTITION BY "
            "cluster_id ORDER BY rowid DESC) AS n FROM cluster_events) WHERE n <= ? ORDER BY cluster_id, seq", (limit,))
        out: dict[int, list[dict]] = {}
        for cid, at, e, c in rows:
            out.setdefault(cid, []).append({"at": at, "event": e, "clusters": json.loads(c)})
        return out

    def counts(self) -> dict[str, int]:
        q = {"images": "SELECT COUNT(*) FROM images", "matches": "SELECT COUNT(*) FROM matches",
             "clusters": "SELECT COUNT(*) FROM (SELECT cluster_id FROM clusters GROUP BY cluster_id HAVING COUNT(*) > 1)"}
        return self._counts(q)
