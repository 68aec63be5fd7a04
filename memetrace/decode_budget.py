"""A per-process bound on the pixels being decoded at once.

Decoding is the one step whose memory follows the input rather than the pipeline: a PNG or WebP
is decompressed at full size before it can be shrunk (3-4 bytes per pixel, more for 16-bit or
alpha), so 8 concurrent 60-megapixel uploads would take gigabytes. :class:`DecodeBudget` is a
semaphore counted in pixels: :func:`memetrace.imageio.decode` holds the pixels it is about to
decompress, read from the header, until the image is shrunk to its working size.

Waiters are served in arrival order, so a large image is not starved by a stream of small ones.
An image larger than the whole budget is decoded alone (once nothing else is in flight) rather
than refused or left waiting for ever; ``MEMETRACE_MAX_PIXELS`` is what refuses images.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memetrace.settings import Settings


class DecodeBudget:
    """Thread-safe; ``in_flight`` and ``peak`` are the pixels held now and at most so far."""

    def __init__(self, pixels: int) -> None:
        if pixels <= 0:
            raise ValueError(f"decode budget must be > 0 pixels, got {pixels}")
        self.pixels = pixels
        self.in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @staticmethod
    def from_settings(s: Settings) -> DecodeBudget:
        """The process's one budget of ``MEMETRACE_DECODE_BUDGET_PIXELS``, shared by every caller."""
        return _shared(s.decode_budget_pixels)

    def _fits(self, pixels: int) -> bool:
        return self.in_flight == 0 or self.in_flight + pixels <= self.pixels

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Block until ``pixels`` fit in the budget (first come, first served), hold them inside."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(lambda: self._queue[0] is ticket and self._fits(pixels))
            finally:
                self._queue.remove(ticket)  # also when interrupted: the others must not wait behind it
                self._cond.notify_all()  # the next in line may fit too
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= pixels
                self._cond.notify_all()


@functools.cache
def _shared(pixels: int) -> DecodeBudget:
    return DecodeBudget(pixels)
