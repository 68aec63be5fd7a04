"""The clusterer's own data, behind :class:`GraphState`: what it was told, and what it decided.

Inputs (written by whoever feeds the clusterer: the clusterer service from the Kafka topics, the
batch pipeline from its run; every write is idempotent, so a redelivered batch changes nothing)::

    images   (image_id, nb_points)                         first row kept
    matches  (a < b, inliers, kind, geometry a -> b or NULL)  keyed by pair, the last one wins
    posts    (post_id, image_id, posted_at, platform, seen_at)  occurrences: posts, files ("file")

Decisions (written by ``recluster`` once a run is published, all in one transaction)::

    clusters        image -> cluster id, the last run's assignment (and each cluster's size)
    components      image -> connected-component label, for images in a component of 2+
                    (a persisted union-find: an image without a label is alone)
    cluster_events  each cluster's history: created, grew, shrank, merged, split, dissolved
    cluster_posts   each cluster's (2+) posts per platform, first and last seen, as of its last run:
                    a growing cluster's summary adds the new posts to these, not re-reading its posts

Incremental runs: every write that changes an input (a new image, a new or changed edge, a new
post, a removed image) appends the image ids it touches to a change log (:meth:`GraphState.pending`);
a run reads the log, closes it over components (labels, then edges of their members, until no new
component shows up), recomputes only those, and clears the log up to its cursor when it saves
(:meth:`GraphState.save_run`): a run that fails before saving leaves the log for the next one. Fresh
cluster ids and component labels come from counters that never go back, so an id is never reused.

Backends: :class:`SqliteGraphState` (one file, ``cluster_state_path``, with one writer: the
clusterer service, or the batch pipeline) and :class:`MemoryGraphState` (tests).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from typing import NamedTuple

from memetrace.models import Geometry, Match
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


class Pending(NamedTuple):
    """The change log since the last saved run."""
    cursor: int  # the last change read: ``save_run(cursor=...)`` forgets the log up to it
    images: set[int]  # images added, removed, given a new or changed edge, or a new post
    splits: set[int] = set()  # images whose component lost an image: it may have come apart
    edges: set[tuple[int, int]] = set()  # pairs (a < b) new or changed, or held back until their image came
    posts: set[int] = set()  # row ids of the posts added (see :meth:`GraphState.post_totals`)


class PostTotals(NamedTuple):
    """Posts of one key (an image, a cluster) on one platform."""
    key: int
    platform: str
    posts: int
    first: int  # unix s
    last: int


#: what a change-log row says about its image (and ``other``, for an edge)
ADDED, EDGE, POST, REMOVED, SPLIT = range(5)


def _pending(rows: Iterable[tuple[int, int, int | None, int]]) -> Pending:
    """The log's rows (seq, image, other, what) as a :class:`Pending`."""
    cursor, images, splits, edges, posts = 0, set(), set(), set(), set()
    for seq, image, other, what in rows:
        cursor = max(cursor, seq)
        images.add(image)
        if what == EDGE:
            images.add(other)
            edges.add((image, other))
        elif what == SPLIT:
            splits.add(image)
        elif what == POST:
            posts.add(other)
    return Pending(cursor, images, splits, edges, posts)


class Totals(NamedTuple):
    """Clusters of 2+ images after the last saved run."""
    clusters: int
    images: int  # in them
    largest: int


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
    def remove_images(self, image_ids: Iterable[int]) -> None:
        """Forget the images, their edges and occurrences; the next run drops their assignments and
        recomputes what is left of their components (they may split)."""

    @abstractmethod
    def images(self) -> dict[int, int]:
        """image id -> nb_points."""

    @abstractmethod
    def known(self, image_ids: Collection[int]) -> set[int]:
        """Those of ``image_ids`` that are images."""

    @abstractmethod
    def matches(self) -> list[Match]:
        """Every edge, a < b."""

    @abstractmethod
    def edges_of(self, image_ids: Collection[int]) -> list[Match]:
        """The edges with an end in ``image_ids`` (a < b)."""

    @abstractmethod
    def clusters(self) -> dict[int, int]:
        """image id -> cluster id, as the last saved run left them."""

    @abstractmethod
    def clusters_of(self, image_ids: Collection[int]) -> dict[int, int]:
        """image id -> cluster id for those of ``image_ids`` that have one."""

    @abstractmethod
    def components_of(self, image_ids: Collection[int]) -> dict[int, int]:
        """image id -> component label, for those of ``image_ids`` in a component of 2+."""

    @abstractmethod
    def component_members(self, labels: Collection[int]) -> dict[int, int]:
        """image id -> label, for every image labelled with one of ``labels``."""

    @abstractmethod
    def label_stats(self, labels: Collection[int]) -> dict[int, tuple[int, int, int]]:
        """label -> (images, smallest image id, clusters among them), for each of ``labels``."""

    @abstractmethod
    def post_totals(self, rows: Collection[int]) -> list[PostTotals]:
        """The posts of row ids ``rows`` (:attr:`Pending.posts`) per (image, platform)."""

    @abstractmethod
    def cluster_posts(self, cluster_ids: Collection[int]) -> list[PostTotals]:
        """The saved post totals of ``cluster_ids`` (clusters of 2+) per (cluster, platform)."""

    @abstractmethod
    def recent_posts(self, now: float, cluster_ids: Collection[int]) -> list[tuple[int, str, int, int]]:
        """(cluster, platform, posts in the hour before ``now``, in the day) of the images saved in
        ``cluster_ids``: reads only the last day's posts."""

    @abstractmethod
    def pending(self) -> Pending:
        """What changed since the last run that saved its cursor."""

    @abstractmethod
    def next_ids(self) -> tuple[int, int]:
        """The next fresh cluster id and component label: above any ever saved."""

    @abstractmethod
    def save_run(self, changed: dict[int, int], at: int, events: Iterable[EventRow] = (), *,
                 components: dict[int, int | None] | None = None, dropped: Collection[int] = (),
                 cursor: int | None = None, posts: dict[int, list[PostTotals]] | None = None) -> None:
        """Set the cluster of the ``changed`` images (the others keep theirs), forget the cluster of the
        ``dropped`` ones, relabel ``components`` (None: now alone), replace the post totals of the
        clusters in ``posts`` (an empty list: gone), forget the change log up to ``cursor`` and record
        the run's history ``events`` at ``at`` (unix s), all or nothing: a run that fails before this
        records no event, so the run redoing it does not record them twice."""

    @abstractmethod
    def occurrence_stats(self, now: float, image_ids: Collection[int] | None = None) -> list[OccurrenceStats]:
        """Per (image, platform) of ``image_ids`` (None: all): posts, first and last seen, posts in the
        last hour and day.

        A post's time is when it was posted, or when the state first saw it if unknown or later (a
        post dated in the future would otherwise count as growth, and as last seen, for ever)."""

    @abstractmethod
    def cluster_histories(self, limit: int = 20, cluster_ids: Collection[int] | None = None) -> dict[int, list[dict]]:
        """cluster id (of ``cluster_ids``, None: all) -> its latest ``limit`` events ({"at", "event",
        "clusters"}), oldest first."""

    @abstractmethod
    def totals(self) -> Totals:
        """Clusters of 2+ images, as the last saved run left them."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """images, matches, and clusters of 2+ images."""

    def close(self) -> None:
        """Release the backend (nothing for the in-memory one)."""


def _post_time(posted_at: int, seen_at: float) -> int:
    return min(posted_at, int(seen_at)) if posted_at >= 0 else int(seen_at)


def _size_changes(old: dict[int, int], changed: dict[int, int], dropped: Collection[int]) -> Counter[int]:
    """Images gained (or lost: negative) per cluster when ``changed`` and ``dropped`` apply to ``old``."""
    delta: Counter[int] = Counter()
    for image in [*changed, *dropped]:
        if image in old:
            delta[old[image]] -= 1
    for cid in changed.values():
        delta[cid] += 1
    return delta


def add_totals(rows: Iterable[PostTotals]) -> list[PostTotals]:
    """``rows`` summed per (key, platform), sorted."""
    acc: dict[tuple[int, str], PostTotals] = {}
    for r in rows:
        a = acc.get((r.key, r.platform))
        acc[r.key, r.platform] = r if a is None else a._replace(posts=a.posts + r.posts, first=min(a.first, r.first),
                                                                last=max(a.last, r.last))
    return [acc[k] for k in sorted(acc)]


def _next(current: int, given: Iterable[int | None]) -> int:
    return max([current, *(v + 1 for v in given if v is not None)])


class MemoryGraphState(GraphState):
    def __init__(self) -> None:
        self._images: dict[int, int] = {}
        self._matches: dict[tuple[int, int], Match] = {}
        self._posts: dict[str, tuple[int, int, str, float, int]] = {}  # id -> (image, posted_at, platform, seen_at, row)
        self._totals: dict[int, list[PostTotals]] = {}
        self._clusters: dict[int, int] = {}
        self._sizes: Counter[int] = Counter()
        self._components: dict[int, int] = {}
        self._events: list[tuple[int, str, int, list[int]]] = []
        self._log: list[tuple[int, int, int | None, int]] = []  # (seq, image, other, what)
        self._held: dict[int, list[tuple[int, int]]] = {}  # image not known yet -> its edges
        self._seq = 0
        self._next = (1, 1)

    def _touch(self, image_ids: Iterable[int], what: int, other: int | None = None) -> None:
        for image in image_ids:
            self._seq += 1
            self._log.append((self._seq, image, other, what))

    def add_images(self, rows: Iterable[tuple[int, int]]) -> None:
        for image_id, nb_points in rows:
            if image_id not in self._images:
                self._images[image_id] = nb_points
                self._touch([image_id], ADDED)
                for a, b in self._held.pop(image_id, []):  # edges that came before it: changes now
                    if (a, b) in self._matches:
                        self._touch([a], EDGE, b)

    def add_matches(self, matches: Iterable[Match]) -> None:
        for m in matches:
            a, b = min(m.a, m.b), max(m.a, m.b)
            geo = m.geometry if m.geometry is None or m.a < m.b else m.geometry.swapped()
            edge = Match(a, b, m.inliers, m.kind, geo)
            if self._matches.get((a, b)) != edge:
                self._matches[a, b] = edge
                self._touch([a], EDGE, b)
                for end in {a, b} - self._images.keys():
                    self._held.setdefault(end, []).append((a, b))

    def add_posts(self, rows: Iterable[Post]) -> None:
        now = time.time()
        for post_id, image_id, posted_at, platform in rows:
            if post_id not in self._posts:
                row = self._seq + 1  # its log row's seq: unique
                self._posts[post_id] = (image_id, posted_at, platform, now, row)
                self._touch([image_id], POST, row)

    def remove_images(self, image_ids: Iterable[int]) -> None:
        gone = set(image_ids)
        labels = {self._components[i] for i in gone if i in self._components}
        self._touch(sorted(gone), REMOVED)
        self._touch([i for i, c in self._components.items() if c in labels and i not in gone], SPLIT)
        self._images = {i: n for i, n in self._images.items() if i not in gone}
        self._matches = {k: m for k, m in self._matches.items() if not {m.a, m.b} & gone}
        self._posts = {k: p for k, p in self._posts.items() if p[0] not in gone}
        self._components = {i: c for i, c in self._components.items() if i not in gone}

    def images(self) -> dict[int, int]:
        return dict(self._images)

    def known(self, image_ids: Collection[int]) -> set[int]:
        return {i for i in image_ids if i in self._images}

    def matches(self) -> list[Match]:
        return list(self._matches.values())

    def edges_of(self, image_ids: Collection[int]) -> list[Match]:
        ids = set(image_ids)
        return [m for m in self._matches.values() if m.a in ids or m.b in ids]

    def clusters(self) -> dict[int, int]:
        return dict(self._clusters)

    def clusters_of(self, image_ids: Collection[int]) -> dict[int, int]:
        return {i: self._clusters[i] for i in image_ids if i in self._clusters}

    def components_of(self, image_ids: Collection[int]) -> dict[int, int]:
        return {i: self._components[i] for i in image_ids if i in self._components}

    def component_members(self, labels: Collection[int]) -> dict[int, int]:
        wanted = set(labels)
        return {i: c for i, c in self._components.items() if c in wanted}

    def label_stats(self, labels: Collection[int]) -> dict[int, tuple[int, int, int]]:
        members: dict[int, list[int]] = {}
        for image, label in self.component_members(labels).items():
            members.setdefault(label, []).append(image)
        return {label: (len(ms), min(ms), len({self._clusters[i] for i in ms if i in self._clusters}))
                for label, ms in members.items()}

    def post_totals(self, rows: Collection[int]) -> list[PostTotals]:
        wanted = set(rows)
        return add_totals(PostTotals(image, platform, 1, t, t) for image, platform, t, row in self._post_times()
                          if row in wanted)

    def cluster_posts(self, cluster_ids: Collection[int]) -> list[PostTotals]:
        return [t for c in sorted(set(cluster_ids)) for t in self._totals.get(c, [])]

    def recent_posts(self, now: float, cluster_ids: Collection[int]) -> list[tuple[int, str, int, int]]:
        wanted, hour, day = set(cluster_ids), int(now - 3600), int(now - 86400)
        acc: Counter[tuple[int, str, bool]] = Counter()
        for image, platform, t, _ in self._post_times():
            if t >= day and self._clusters.get(image) in wanted:
                acc[self._clusters[image], platform, t >= hour] += 1
        keys = {(c, p) for c, p, _ in acc}
        return [(c, p, acc[c, p, True], acc[c, p, True] + acc[c, p, False]) for c, p in sorted(keys)]

    def _post_times(self) -> list[tuple[int, str, int, int]]:
        return [(image, platform, _post_time(posted_at, seen_at), row)
                for image, posted_at, platform, seen_at, row in self._posts.values()]

    def pending(self) -> Pending:
        return _pending(self._log)

    def next_ids(self) -> tuple[int, int]:
        return self._next

    def save_run(self, changed: dict[int, int], at: int, events: Iterable[EventRow] = (), *,
                 components: dict[int, int | None] | None = None, dropped: Collection[int] = (),
                 cursor: int | None = None, posts: dict[int, list[PostTotals]] | None = None) -> None:
        rows = [(at, e, c, list(related)) for e, c, related in events]  # read first: all or nothing
        for cid, totals in (posts or {}).items():
            self._totals[cid] = list(totals)
        self._totals = {c: t for c, t in self._totals.items() if t}
        components = components or {}
        self._sizes.update(_size_changes(self._clusters, changed, dropped))
        self._sizes = +self._sizes  # drop the emptied clusters
        for image in dropped:
            self._clusters.pop(image, None)
        self._clusters.update(changed)
        for image, label in components.items():
            if label is None:
                self._components.pop(image, None)
            else:
                self._components[image] = label
        if cursor is not None:
            self._log = [row for row in self._log if row[0] > cursor]
        self._next = (_next(self._next[0], changed.values()), _next(self._next[1], components.values()))
        self._events += rows

    def occurrence_stats(self, now: float, image_ids: Collection[int] | None = None) -> list[OccurrenceStats]:
        wanted = None if image_ids is None else set(image_ids)
        times: dict[tuple[int, str], list[int]] = {}
        for image_id, posted_at, platform, seen_at, _ in self._posts.values():
            if wanted is None or image_id in wanted:
                times.setdefault((image_id, platform), []).append(_post_time(posted_at, seen_at))
        hour, day = int(now - 3600), int(now - 86400)
        return [OccurrenceStats(i, p, len(ts), min(ts), max(ts), sum(t >= hour for t in ts), sum(t >= day for t in ts))
                for (i, p), ts in times.items()]

    def cluster_histories(self, limit: int = 20, cluster_ids: Collection[int] | None = None) -> dict[int, list[dict]]:
        wanted = None if cluster_ids is None else set(cluster_ids)
        out: dict[int, list[dict]] = {}
        for at, event, cid, related in self._events:
            if wanted is None or cid in wanted:
                out.setdefault(cid, []).append({"at": at, "event": event, "clusters": related})
        return {cid: events[-limit:] for cid, events in out.items()}

    def totals(self) -> Totals:
        multi = [n for n in self._sizes.values() if n > 1]
        return Totals(len(multi), sum(multi), max(multi, default=0))

    def counts(self) -> dict[str, int]:
        return {"images": len(self._images), "matches": len(self._matches), "clusters": self.totals().clusters}


_TIME = ("CASE WHEN posted_at >= 0 THEN MIN(posted_at, CAST(seen_at AS INTEGER)) ELSE CAST(seen_at AS INTEGER)"
         " END")  # _post_time in SQL, as indexed by posts_time (a query uses this very expression)
_POST_TIME = f"{_TIME} t"

FORMAT = FileFormat(
    application_id=0x4D544753,  # "MTGS": memetrace graph state
    version=3,  # 2: change log, component labels, cluster sizes, id counters (incremental runs); 3: cluster_posts
    what="clusterer state",
    fix="delete it (batch: then run `memetrace index` again; the clusterer service: then replay the "
        "images and matches topics into it with a new MEMETRACE_KAFKA_CLUSTER_GROUP_ID)",
    schema="""
CREATE TABLE IF NOT EXISTS images (image_id INTEGER PRIMARY KEY, nb_points INTEGER NOT NULL, comp INTEGER);
CREATE INDEX IF NOT EXISTS images_comp ON images(comp) WHERE comp IS NOT NULL;
CREATE TABLE IF NOT EXISTS matches (a INTEGER NOT NULL, b INTEGER NOT NULL, inliers INTEGER NOT NULL,
    kind TEXT NOT NULL, geometry TEXT, PRIMARY KEY (a, b)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS matches_b ON matches(b);
CREATE TABLE IF NOT EXISTS posts (post_id TEXT PRIMARY KEY, image_id INTEGER NOT NULL, posted_at INTEGER NOT NULL,
    platform TEXT NOT NULL, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS posts_image ON posts(image_id);
CREATE TABLE IF NOT EXISTS clusters (image_id INTEGER PRIMARY KEY, cluster_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cluster_sizes (cluster_id INTEGER PRIMARY KEY, images INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS cluster_sizes_multi ON cluster_sizes(images) WHERE images > 1;
CREATE TABLE IF NOT EXISTS cluster_events (at INTEGER NOT NULL, event TEXT NOT NULL, cluster_id INTEGER NOT NULL,
    clusters TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS cluster_events_cluster ON cluster_events(cluster_id);
CREATE INDEX IF NOT EXISTS posts_time ON posts(%s);
CREATE TABLE IF NOT EXISTS cluster_posts (cluster_id INTEGER NOT NULL, platform TEXT NOT NULL, posts INTEGER NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL, PRIMARY KEY (cluster_id, platform)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY, image_id INTEGER NOT NULL, other INTEGER,
    what INTEGER NOT NULL);  -- state.py's ADDED, EDGE (image_id = a, other = b), POST (other = its rowid), REMOVED,
    -- SPLIT
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, next INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('cluster', 1), ('component', 1);
CREATE TRIGGER IF NOT EXISTS image_added AFTER INSERT ON images BEGIN
    INSERT INTO changes (image_id, what) VALUES (NEW.image_id, 0);
    INSERT INTO changes (image_id, other, what) SELECT a, b, 1 FROM matches WHERE a = NEW.image_id;
    INSERT INTO changes (image_id, other, what) SELECT a, b, 1 FROM matches WHERE b = NEW.image_id; END;
CREATE TRIGGER IF NOT EXISTS match_added AFTER INSERT ON matches BEGIN
    INSERT INTO changes (image_id, other, what) VALUES (NEW.a, NEW.b, 1); END;
CREATE TRIGGER IF NOT EXISTS match_changed AFTER UPDATE ON matches BEGIN
    INSERT INTO changes (image_id, other, what) VALUES (NEW.a, NEW.b, 1); END;
CREATE TRIGGER IF NOT EXISTS post_added AFTER INSERT ON posts BEGIN
    INSERT INTO changes (image_id, other, what) VALUES (NEW.image_id, NEW.rowid, 2); END""" % _TIME)
_IDS = "(SELECT value FROM json_each(?))"  # a set of ids as one JSON parameter: no variable limit


def _edge_row(m: Match) -> tuple[int, int, int, str, str | None]:
    """A match as its row: a < b, the geometry (oriented a -> b) as JSON or NULL."""
    geo = m.geometry if m.geometry is None or m.a < m.b else m.geometry.swapped()
    return min(m.a, m.b), max(m.a, m.b), m.inliers, m.kind, None if geo is None else json.dumps(geo.to_dict())


def _edge(a: int, b: int, inliers: int, kind: str, geometry: str | None) -> Match:
    return Match(a, b, inliers, kind, None if geometry is None else Geometry.from_dict(json.loads(geometry)))


def _ids(image_ids: Iterable[int]) -> tuple[str]:
    return (json.dumps(sorted(set(image_ids))),)


class SqliteGraphState(SqliteStore, GraphState):
    FORMAT = FORMAT

    def add_images(self, rows: Iterable[tuple[int, int]]) -> None:
        self.file.write("INSERT OR IGNORE INTO images (image_id, nb_points) VALUES (?, ?)", rows)

    def add_matches(self, matches: Iterable[Match]) -> None:
        # an edge seen again unchanged is no change: the update (and its trigger) only when it differs
        self.file.write("INSERT INTO matches VALUES (?, ?, ?, ?, ?) ON CONFLICT (a, b) DO UPDATE SET inliers ="
                        " excluded.inliers, kind = excluded.kind, geometry = excluded.geometry WHERE inliers !="
                        " excluded.inliers OR kind != excluded.kind OR geometry IS NOT excluded.geometry",
                        [(*_edge_row(m),) for m in matches])

    def add_posts(self, rows: Iterable[Post]) -> None:
        now = time.time()
        self.file.write("INSERT OR IGNORE INTO posts VALUES (?, ?, ?, ?, ?)", [(*r, now) for r in rows])

    def remove_images(self, image_ids: Iterable[int]) -> None:
        ids = [_ids(image_ids)]
        self.file.transaction([
            (f"INSERT INTO changes (image_id, what) SELECT image_id, {SPLIT} FROM images WHERE comp IN (SELECT comp"
             f" FROM images WHERE image_id IN {_IDS} AND comp IS NOT NULL)", ids),  # what is left of their components
            (f"INSERT INTO changes (image_id, what) SELECT value, {REMOVED} FROM json_each(?)", ids),
            (f"DELETE FROM matches WHERE a IN {_IDS}", ids), (f"DELETE FROM matches WHERE b IN {_IDS}", ids),
            (f"DELETE FROM posts WHERE image_id IN {_IDS}", ids), (f"DELETE FROM images WHERE image_id IN {_IDS}", ids)])

    def images(self) -> dict[int, int]:
        return dict(self.file.read("SELECT image_id, nb_points FROM images"))

    def known(self, image_ids: Collection[int]) -> set[int]:
        return {r[0] for r in self.file.read(f"SELECT image_id FROM images WHERE image_id IN {_IDS}", _ids(image_ids))}

    def matches(self) -> list[Match]:
        return [_edge(*r) for r in self.file.read("SELECT a, b, inliers, kind, geometry FROM matches")]

    def edges_of(self, image_ids: Collection[int]) -> list[Match]:
        rows = self.file.read(f"SELECT a, b, inliers, kind, geometry FROM matches WHERE a IN {_IDS} UNION "
                              f"SELECT a, b, inliers, kind, geometry FROM matches WHERE b IN {_IDS}", _ids(image_ids) * 2)
        return [_edge(*r) for r in rows]

    def clusters(self) -> dict[int, int]:
        return dict(self.file.read("SELECT image_id, cluster_id FROM clusters"))

    def clusters_of(self, image_ids: Collection[int]) -> dict[int, int]:
        return dict(self.file.read(f"SELECT image_id, cluster_id FROM clusters WHERE image_id IN {_IDS}",
                                   _ids(image_ids)))

    def components_of(self, image_ids: Collection[int]) -> dict[int, int]:
        return dict(self.file.read(f"SELECT image_id, comp FROM images WHERE image_id IN {_IDS} AND comp IS NOT NULL",
                                   _ids(image_ids)))

    def component_members(self, labels: Collection[int]) -> dict[int, int]:
        return dict(self.file.read(f"SELECT image_id, comp FROM images WHERE comp IN {_IDS}", _ids(labels)))

    def label_stats(self, labels: Collection[int]) -> dict[int, tuple[int, int, int]]:
        rows = self.file.read(f"SELECT comp, COUNT(*), MIN(i.image_id), COUNT(DISTINCT c.cluster_id) FROM images i LEFT"
                              f" JOIN clusters c USING (image_id) WHERE comp IN {_IDS} GROUP BY comp", _ids(labels))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def post_totals(self, rows: Collection[int]) -> list[PostTotals]:
        got = self.file.read(f"SELECT image_id, platform, COUNT(*), MIN(t), MAX(t) FROM (SELECT image_id, platform,"
                             f" {_POST_TIME} FROM posts WHERE rowid IN {_IDS}) GROUP BY image_id, platform", _ids(rows))
        return [PostTotals(*r) for r in got]

    def cluster_posts(self, cluster_ids: Collection[int]) -> list[PostTotals]:
        got = self.file.read(f"SELECT * FROM cluster_posts WHERE cluster_id IN {_IDS} ORDER BY 1, 2", _ids(cluster_ids))
        return [PostTotals(*r) for r in got]

    def recent_posts(self, now: float, cluster_ids: Collection[int]) -> list[tuple[int, str, int, int]]:
        return self.file.read(
            f"SELECT c.cluster_id, p.platform, SUM({_TIME} >= ?), COUNT(*) FROM posts p JOIN clusters c USING (image_id)"
            f" WHERE {_TIME} >= ? AND c.cluster_id IN {_IDS} GROUP BY c.cluster_id, p.platform ORDER BY 1, 2",
            (int(now - 3600), int(now - 86400), *_ids(cluster_ids)))

    def pending(self) -> Pending:
        (cursor,) = self.file.read("SELECT COALESCE(MAX(seq), 0) FROM changes")[0]
        upto = (cursor,)  # one snapshot: rows written meanwhile stay for the next run
        edges = self.file.read(f"SELECT DISTINCT image_id, other FROM changes WHERE seq <= ? AND what = {EDGE}", upto)
        images = self.file.read("SELECT image_id FROM changes WHERE seq <= ? UNION SELECT other FROM changes WHERE seq"
                                f" <= ? AND what = {EDGE}", upto * 2)
        splits = self.file.read(f"SELECT DISTINCT image_id FROM changes WHERE seq <= ? AND what = {SPLIT}", upto)
        posts = self.file.read(f"SELECT other FROM changes WHERE seq <= ? AND what = {POST}", upto)
        return Pending(cursor, {r[0] for r in images}, {r[0] for r in splits}, set(edges), {r[0] for r in posts})

    def next_ids(self) -> tuple[int, int]:
        found = dict(self.file.read("SELECT name, next FROM counters"))
        return found["cluster"], found["component"]

    def save_run(self, changed: dict[int, int], at: int, events: Iterable[EventRow] = (), *,
                 components: dict[int, int | None] | None = None, dropped: Collection[int] = (),
                 cursor: int | None = None, posts: dict[int, list[PostTotals]] | None = None) -> None:
        rows = [(at, e, c, json.dumps(list(related))) for e, c, related in events]  # read first: all or nothing
        posts = posts or {}
        components = components or {}
        sizes = _size_changes(self.clusters_of([*changed, *dropped]), changed, dropped)
        next_cluster, next_component = self.next_ids()
        self.file.transaction([
            ("INSERT OR REPLACE INTO clusters VALUES (?, ?)", changed.items()),
            ("DELETE FROM clusters WHERE image_id = ?", [(i,) for i in dropped]),
            ("INSERT INTO cluster_sizes VALUES (?, ?) ON CONFLICT (cluster_id) DO UPDATE SET images = images +"
             " excluded.images", sizes.items()),
            ("DELETE FROM cluster_sizes WHERE cluster_id = ? AND images <= 0", [(c,) for c, n in sizes.items() if n < 0]),
            ("UPDATE images SET comp = ? WHERE image_id = ?", [(c, i) for i, c in components.items()]),
            ("DELETE FROM changes WHERE seq <= ?", [] if cursor is None else [(cursor,)]),
            ("UPDATE counters SET next = ? WHERE name = ?", [(_next(next_cluster, changed.values()), "cluster"),
                                                            (_next(next_component, components.values()), "component")]),
            ("DELETE FROM cluster_posts WHERE cluster_id = ?", [(c,) for c in posts]),
            ("INSERT INTO cluster_posts VALUES (?, ?, ?, ?, ?)", [(c, *t[1:]) for c, ts in posts.items() for t in ts]),
            ("INSERT INTO cluster_events VALUES (?, ?, ?, ?)", rows)])

    def occurrence_stats(self, now: float, image_ids: Collection[int] | None = None) -> list[OccurrenceStats]:
        where, args = ("", ()) if image_ids is None else (f" WHERE image_id IN {_IDS}", _ids(image_ids))
        rows = self.file.read(
            "SELECT image_id, platform, COUNT(*), MIN(t), MAX(t), SUM(t >= ?), SUM(t >= ?) FROM ("
            f" SELECT image_id, platform, {_POST_TIME} FROM posts{where}) GROUP BY image_id, platform",
            (int(now - 3600), int(now - 86400), *args))
        return [OccurrenceStats(*r) for r in rows]

    def cluster_histories(self, limit: int = 20, cluster_ids: Collection[int] | None = None) -> dict[int, list[dict]]:
        where, args = ("", ()) if cluster_ids is None else (f" WHERE cluster_id IN {_IDS}", _ids(cluster_ids))
        rows = self.file.read(  # one query for every cluster
            "SELECT cluster_id, at, event, clusters FROM (SELECT *, rowid AS seq, ROW_NUMBER() OVER (PARTITION BY "
            f"cluster_id ORDER BY rowid DESC) AS n FROM cluster_events{where}) WHERE n <= ? ORDER BY cluster_id, seq",
            (*args, limit))
        out: dict[int, list[dict]] = {}
        for cid, at, e, c in rows:
            out.setdefault(cid, []).append({"at": at, "event": e, "clusters": json.loads(c)})
        return out

    def totals(self) -> Totals:
        (row,) = self.file.read("SELECT COUNT(*), COALESCE(SUM(images), 0), COALESCE(MAX(images), 0) FROM cluster_sizes"
                                " WHERE images > 1")
        return Totals(*row)

    def counts(self) -> dict[str, int]:
        q = {"images": "SELECT COUNT(*) FROM images", "matches": "SELECT COUNT(*) FROM matches",
             "clusters": "SELECT COUNT(*) FROM cluster_sizes WHERE images > 1"}
        return self._counts(q)
