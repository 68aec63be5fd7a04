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
from dataclasses import replace

from memetrace.messages import (AUTHOR_BYTES, MAX_DETAIL, MAX_META_KEYS, META_BYTES, META_KEY_BYTES, META_VALUE_BYTES,
                                PLATFORM_BYTES, POST_ID_BYTES, URL_BYTES)
from memetrace.models import DeadLetterRow, OccurrenceRow
from memetrace.varchar import fitted, fitted_mapping

#: the UTF-8 bytes each backend keeps of a string field (:func:`memetrace.varchar.fitted`); a valid
#: post's id, URL and platform fit whole (memetrace.messages bounds them so)
OCCURRENCE_BYTES = {"post_id": POST_ID_BYTES, "url": URL_BYTES, "platform": PLATFORM_BYTES, "author": AUTHOR_BYTES}
#: a dead letter's post id and URL are the message's, unchecked: cut like the rest
DEAD_LETTER_BYTES = {"reason": 64, "detail": MAX_DETAIL, "post_id": POST_ID_BYTES, "url": URL_BYTES, "source": 512}


def fitted_occurrence(row: OccurrenceRow) -> OccurrenceRow:
    """``row`` as every backend keeps it: strings cut to :data:`OCCURRENCE_BYTES`, its meta to the
    bounds of :class:`memetrace.messages.Post` (a valid post's meta is kept whole; a posts CSV's
    extra columns are not checked, so they are cut here)."""
    return replace(fitted(row, OCCURRENCE_BYTES),
                   meta=fitted_mapping(row.meta, MAX_META_KEYS, META_KEY_BYTES, META_VALUE_BYTES, META_BYTES))


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
    def occurrences_of(self, image_ids: Sequence[int]) -> list[OccurrenceRow]:
        """Every post of these images, with ``seen_at`` (unix seconds it was stored) and its meta as
        stored (:func:`fitted_occurrence`), in no given order."""

    @abstractmethod
    def image_ids_of_occurrences(self) -> list[int]:
        """The image id of every occurrence (one entry per post)."""

    @abstractmethod
    def dead_letters_by_reason(self) -> dict[str, int]:
        """reason -> dead letters, sorted by reason."""

    @abstractmethod
    def remove_images(self, image_ids: Sequence[int]) -> None:
        """Delete every post of these images (dead letters stay: they show no stored image)."""


class MemoryOccurrenceLog(OccurrenceLog):
    """Dicts keyed like the real backend, strings cut alike; thread-safe."""

    def __init__(self) -> None:
        self._posts: dict[int, OccurrenceRow] = {}
        self._dead: dict[int, DeadLetterRow] = {}
        self._lock = threading.Lock()

    def add_occurrences(self, rows: Sequence[OccurrenceRow]) -> None:
        now = int(time.time())
        with self._lock:
            self._posts.update((r.id, replace(fitted_occurrence(r), seen_at=now)) for r in rows)

    def add_dead_letters(self, rows: Sequence[DeadLetterRow]) -> None:
        with self._lock:
            self._dead.update((r.id, fitted(r, DEAD_LETTER_BYTES)) for r in rows)

    def count_occurrences(self) -> int:
        with self._lock:
            return len(self._posts)

    def count_dead_letters(self) -> int:
        with self._lock:
            return len(self._dead)

    def occurrences_of(self, image_ids: Sequence[int]) -> list[OccurrenceRow]:
        wanted = {int(i) for i in image_ids}
        with self._lock:
            return [p for p in self._posts.values() if p.image_id in wanted]

    def image_ids_of_occurrences(self) -> list[int]:
        with self._lock:
            return [p.image_id for p in self._posts.values()]

    def dead_letters_by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(Counter(d.reason for d in self._dead.values()).items()))

    def remove_images(self, image_ids: Sequence[int]) -> None:
        gone = {int(i) for i in image_ids}
        with self._lock:
            self._posts = {k: p for k, p in self._posts.items() if p.image_id not in gone}
