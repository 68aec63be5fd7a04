"""The errors a stage sees from its dependencies, whatever client library is behind them.

Each adapter (Milvus, Kafka, S3, the local disk) turns its client's transient failures into one
:class:`DependencyDown` naming the dependency: the consume loop backs off and retries only that,
and readiness reports it. Anything else is either a bad input (dead-lettered) or a bug.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: runs one dependency call (a read or a write of a store), e.g. with the consume loop's retries
Call = Callable[[Callable[[], T]], T]


def call_once(fn: Callable[[], T]) -> T:
    """The default :data:`Call`: no retry, a failure propagates."""
    return fn()


class DependencyDown(Exception):
    """A dependency did not answer or refused for a reason that may pass (down, overloaded, restarting)."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency  # "milvus" | "kafka" | "s3" | ...
        self.detail = detail


class ConfigError(Exception):
    """A setting, address, port or data dir that cannot be used as given: the message names it and the
    fix, and the CLI prints it as one line (``-v`` for the traceback)."""


class Refused(Exception):
    """A dependency refused this input for good (too large for it, not representable): retrying the
    same message cannot help, so the consume loop dead-letters it as poison at once."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} refused the message: {detail}")
        self.dependency = dependency
        self.detail = detail


class StorageDenied(Exception):
    """The local disk refused a write for a reason waiting cannot fix (permissions, read-only): the
    consume loop stops the worker with this one-line message, nothing of the batch committed."""
