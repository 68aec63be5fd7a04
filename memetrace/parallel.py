"""Independent store reads of one request, issued together: a query's latency is otherwise the sum
of its round trips to Milvus and the feature store, each mostly spent waiting."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def concurrently(*calls: Callable[[], Any]) -> list[Any]:
    """Each call's result, in order: the first runs on this thread, each other one on a thread of
    its own (a pool per call, so a call may itself run calls concurrently without waiting for a
    shared pool's free thread). Every call is done before this returns or raises; a failure is
    raised as is, the first in order."""
    if len(calls) == 1:
        return [calls[0]()]
    with ThreadPoolExecutor(len(calls) - 1, thread_name_prefix="read") as pool:
        others = [pool.submit(c) for c in calls[1:]]
        first = calls[0]()
        return [first, *(f.result() for f in others)]
