"""A least-recently-used map bounded by the bytes of its values, not their count.

Prepared keypoints differ in size from image to image (a few points to ``sift_features``), so a
cache bounded by a count holds anything from kilobytes to gigabytes; a long-running matcher or
clusterer must stay within a memory figure an operator can set.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
ENTRY_BYTES = 128  # an entry's own keeping (its key, dict slot, tuple), counted so that even empty values are bounded


class ByteLRU(Generic[K, V]):
    """At most ``max_bytes`` of entries (``size`` of the value plus :data:`ENTRY_BYTES`), the least
    recently used evicted first; thread-safe. A value larger than the whole budget is not kept (it
    would evict everything else and then itself)."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> tuple[bool, V | None]:
        """(found, value): a hit counts as a use. ``found`` tells a cached None from a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return False, None
            self._items.move_to_end(key)
            return True, item[0]

    def put(self, key: K, value: V) -> None:
        n = self._size(value) + ENTRY_BYTES
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if n > self.max_bytes:
                return
            self._items[key] = (value, n)
            self._bytes += n
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    @property
    def nbytes(self) -> int:
        """Bytes held now (values as ``size`` counts them, plus :data:`ENTRY_BYTES` an entry)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
