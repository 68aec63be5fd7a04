"""The cluster board: what the clusterer publishes and the query API reads.

The clusterer is its only writer (:meth:`ClusterBoard.publish`); every API replica reads the
same clusters without sharing the clusterer's state file.

Backends: ``memetrace.milvus.MilvusClusterBoard`` and :class:`MemoryClusterBoard` (tests).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from memetrace.models import ClusterSummary


class ClusterBoard(ABC):
    @abstractmethod
    def publish(self, assignment: dict[int, int], summaries: Sequence[ClusterSummary],
                removed: Sequence[int] = ()) -> None:
        """Upsert ``assignment`` (image -> cluster, changed rows only is enough) and summaries;
        delete the summaries of the ``removed`` cluster ids (merged away or dissolved)."""

    @abstractmethod
    def clusters_of(self, image_ids: Sequence[int]) -> dict[int, int]:
        """image -> cluster id for the given images (those the clusterer has seen)."""

    @abstractmethod
    def members(self, cluster_ids: Sequence[int]) -> dict[int, list[int]]:
        """cluster id -> its images, sorted, for each given cluster (empty when it has none)."""

    @abstractmethod
    def summary(self, cluster_id: int) -> ClusterSummary | None: ...

    @abstractmethod
    def summaries(self) -> list[ClusterSummary]:
        """Every published summary, in no given order."""


class MemoryClusterBoard(ClusterBoard):
    """Dicts; thread-safe. Summaries are kept whole (the Milvus backend trims oversized fields)."""

    def __init__(self) -> None:
        self._cluster_of: dict[int, int] = {}
        self._summaries: dict[int, ClusterSummary] = {}
        self._lock = threading.Lock()

    def publish(self, assignment: dict[int, int], summaries: Sequence[ClusterSummary],
                removed: Sequence[int] = ()) -> None:
        with self._lock:
            self._cluster_of.update((int(i), int(c)) for i, c in assignment.items())
            self._summaries.update((c.cluster_id, c) for c in summaries)
            for c in removed:
                self._summaries.pop(int(c), None)

    def clusters_of(self, image_ids: Sequence[int]) -> dict[int, int]:
        with self._lock:
            return {int(i): self._cluster_of[int(i)] for i in image_ids if int(i) in self._cluster_of}

    def members(self, cluster_ids: Sequence[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {int(c): [] for c in cluster_ids}
        with self._lock:
            for image_id, c in self._cluster_of.items():
                if c in out:
                    out[c].append(image_id)
        return {c: sorted(ids) for c, ids in out.items()}

    def summary(self, cluster_id: int) -> ClusterSummary | None:
        with self._lock:
            return self._summaries.get(int(cluster_id))

    def summaries(self) -> list[ClusterSummary]:
        with self._lock:
            return list(self._summaries.values())
