"""Where derivation trees are kept, behind :class:`TreeStore`: one tree per cluster id, replaced whole.

Written by whoever builds the trees (``memetrace.clusterer.tree_update``: the batch pipeline, the
clusterer service), read by ``memetrace tree`` and the API's ``GET /v1/clusters/{id}/tree``.
Replacing a tree whole keeps a redelivered batch harmless: the same inputs write the same rows.

Backends: :class:`SqliteTreeStore` (one file, ``trees.db`` next to the clusterer state) and
:class:`MemoryTreeStore` (tests).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from memetrace.models import Derivation, OccurrenceRow
from memetrace.sqlite_file import FileFormat, SqliteStore

NOT_POSTS = frozenset({"file"})  # occurrence platforms that are no post: a folder's indexed files


def earliest_posts(rows: Iterable[OccurrenceRow]) -> dict[int, OccurrenceRow]:
    """Each image's earliest post of known time (the first post id on a tie); files are not posts."""
    out: dict[int, OccurrenceRow] = {}
    for r in rows:
        if r.platform in NOT_POSTS or r.posted_at < 0:
            continue
        best = out.get(r.image_id)
        if best is None or (r.posted_at, r.post_id) < (best.posted_at, best.post_id):
            out[r.image_id] = r
    return out


class TreeStore(ABC):
    @abstractmethod
    def put(self, cluster_id: int, tree: Iterable[Derivation]) -> None:
        """Replace the tree of ``cluster_id`` (an empty one: drop it)."""

    @abstractmethod
    def get(self, cluster_id: int) -> list[Derivation]:
        """The tree of ``cluster_id`` by image id ([] when none)."""

    @abstractmethod
    def cluster_ids(self) -> list[int]: ...

    def close(self) -> None:
        """Release the backend (nothing for the in-memory one)."""


class MemoryTreeStore(TreeStore):
    def __init__(self) -> None:
        self._trees: dict[int, list[Derivation]] = {}

    def put(self, cluster_id: int, tree: Iterable[Derivation]) -> None:
        rows = sorted(tree, key=lambda d: d.image_id)
        if rows:
            self._trees[cluster_id] = rows
        else:
            self._trees.pop(cluster_id, None)

    def get(self, cluster_id: int) -> list[Derivation]:
        return list(self._trees.get(cluster_id, []))

    def cluster_ids(self) -> list[int]:
        return sorted(self._trees)


FORMAT = FileFormat(
    application_id=0x4D545452,  # "MTTR": memetrace trees
    version=1,
    what="derivation trees",
    fix="delete it and run `memetrace tree` (batch) or let the clusterer rebuild the trees",
    schema="""
CREATE TABLE IF NOT EXISTS trees (cluster_id INTEGER NOT NULL, image_id INTEGER NOT NULL, parent INTEGER,
    edit TEXT NOT NULL, confidence REAL NOT NULL, PRIMARY KEY (cluster_id, image_id)) WITHOUT ROWID""")


class SqliteTreeStore(SqliteStore, TreeStore):
    FORMAT = FORMAT

    def put(self, cluster_id: int, tree: Iterable[Derivation]) -> None:
        rows = [(cluster_id, d.image_id, d.parent, d.edit, d.confidence) for d in tree]
        self.file.transaction([("DELETE FROM trees WHERE cluster_id = ?", [(cluster_id,)]),
                               ("INSERT INTO trees VALUES (?, ?, ?, ?, ?)", rows)])

    def get(self, cluster_id: int) -> list[Derivation]:
        rows = self.file.read("SELECT image_id, parent, edit, confidence FROM trees WHERE cluster_id = ?"
                              " ORDER BY image_id", (cluster_id,))
        return [Derivation(*r) for r in rows]

    def cluster_ids(self) -> list[int]:
        return [r[0] for r in self.file.read("SELECT DISTINCT cluster_id FROM trees ORDER BY cluster_id")]
