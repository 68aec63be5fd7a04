"""The cluster board: what the clusterer publishes and the query API reads.

The clusterer is its only writer (:meth:`ClusterBoard.publish`); every API replica reads the
same clusters without sharing the clusterer's state file.

Backends: ``memetrace.milvus.MilvusClusterBoard`` and :class:`MemoryClusterBoard` (tests).
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace

from memetrace.models import ClusterSummary

#: the bytes of JSON a summary's platforms and history are kept in (Milvus VARCHARs), the platforms kept
PLATFORMS_BYTES = 4096
HISTORY_BYTES = 16_384
MAX_PLATFORMS = 50


def fitted_summary(c: ClusterSummary) -> ClusterSummary:
    """``c`` as every backend keeps it: its most posted platforms (most first) and latest events
    whose JSON fits their fields; the least posted platforms and the oldest events are left out first."""
    platforms = sorted(c.platforms.items(), key=lambda kv: kv[1])[-MAX_PLATFORMS:]
    platforms = _fitting_tail(platforms, PLATFORMS_BYTES, lambda kv: dict(reversed(kv)))
    return replace(c, platforms=dict(reversed(platforms)), history=_fitting_tail(list(c.history), HISTORY_BYTES, list))


def _fitting_tail(items: list, max_bytes: int, as_json: Callable[[list], object]) -> list:
    """The longest tail of ``items`` whose ``as_json`` JSON fits in ``max_bytes``: cutting the JSON
    text instead would leave it unreadable."""
    while len(json.dumps(as_json(items)).encode("utf-8")) > max_bytes and items:
        items = items[1:]
    return items


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
    def remove_images(self, image_ids: Sequence[int]) -> None:
        """Delete the published cluster of these images (the summaries follow on the next publish)."""

    @abstractmethod
    def summaries(self) -> list[ClusterSummary]:
        """Every published summary, in no given order."""


class MemoryClusterBoard(ClusterBoard):
    """Dicts; thread-safe. Summaries are trimmed as in Milvus (:func:`fitted_summary`)."""

    def __init__(self) -> None:
        self._cluster_of: dict[int, int] = {}
        self._summaries: dict[int, ClusterSummary] = {}
        self._lock = threading.Lock()

    def publish(self, assignment: dict[int, int], summaries: Sequence[ClusterSummary],
                removed: Sequence[int] = ()) -> None:
        with self._lock:
            self._cluster_of.update((int(i), int(c)) for i, c in assignment.items())
            self._summaries.update((c.cluster_id, fitted_summary(c)) for c in summaries)
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

    def remove_images(self, image_ids: Sequence[int]) -> None:
        with self._lock:
            for i in image_ids:
                self._cluster_of.pop(int(i), None)

    def summaries(self) -> list[ClusterSummary]:
        with self._lock:
            return list(self._summaries.values())
