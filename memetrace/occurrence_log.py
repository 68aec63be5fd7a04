"""The occurrence log: every post seen showing a stored image, and every message the ingest dead-lettered.

Written by the ingest workers (all of them share it), read by ``memetrace stats`` and the query
API. Rows are keyed by the message (:func:`memetrace.messages.occurrence_key`,
``deadletter_key``), so a redelivered message overwrites the row it wrote before: the counts are
exact under at-least-once delivery.

Backends: ``memetrace.milvus.MilvusOccurrenceLog`` and :class:`MemoryOccurrenceLog` (tests).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

from memetrace.models import DeadLetterRow, OccurrenceRow

#: what :meth:`OccurrenceLog.occurrences_of` says of a post (``seen_at``: unix seconds it was stored)
OCCURRENCE_FIELDS = ("image_id", "post_id", "url", "posted_at", "platform", "author", "seen_at")


class OccurrenceLog(ABC):
    @abstractmethod
    def add_occurrences(self, rows: Sequence[OccurrenceRow]) -> None:
        """Store these posts; a row whose ``id`` is stored already replaces it."""

    @abstractmethod
    def add_dead_letters(self, rows: Sequence[DeadLetterRow]) -> None:
        """Store these dead letters; a row whose ``id`` is stored already replaces it."""

    @abstractmethod
    def count_occurrences(self) -> int: ...

    @abstractmethod
    def count_dead_letters(self) -> int: ...

    @abstractmethod
    def occurrences_of(self, image_ids: Sequence[int]) -> list[dict]:
        """Every post of these images, as dicts of :data:`OCCURRENCE_FIELDS`, in no given order."""

    @abstractmethod
    def image_ids_of_occurrences(self) -> list[int]:
        """The image id of every occurrence (one entry per post)."""

    @abstractmethod
    def dead_letters_by_reason(self) -> dict[str, int]:
        """reason -> dead letters, sorted by reason."""


class MemoryOccurrenceLog(OccurrenceLog):
    """Dicts keyed like the real backend; thread-safe."""

    def __init__(self) -> None:
        self._posts: dict[int, dict] = {}
        self._dead: dict[int, DeadLetterRow] = {}
        self._lock = threading.Lock()

    def add_occurrences(self, rows: Sequence[OccurrenceRow]) -> None:
        now = int(time.time())
        with self._lock:
            for r in rows:
                self._posts[r.id] = {k: v for k, v in asdict(r).items() if k in OCCURRENCE_FIELDS} | {"seen_at": now}

    def add_dead_letters(self, rows: Sequence[DeadLetterRow]) -> None:
        with self._lock:
            self._dead.update((r.id, r) for r in rows)

    def count_occurrences(self) -> int:
        with self._lock:
            return len(self._posts)

    def count_dead_letters(self) -> int:
        with self._lock:
            return len(self._dead)

    def occurrences_of(self, image_ids: Sequence[int]) -> list[dict]:
        wanted = {int(i) for i in image_ids}
        with self._lock:
            return [dict(p) for p in self._posts.values() if p["image_id"] in wanted]

    def image_ids_of_occurrences(self) -> list[int]:
        with self._lock:
            return [p["image_id"] for p in self._posts.values()]

    def dead_letters_by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(Counter(d.reason for d in self._dead.values()).items()))
