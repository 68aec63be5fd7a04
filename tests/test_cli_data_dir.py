"""One data dir, several processes (issue 15, item 2) and ``stats`` counting what is stored
(item 8): a process storing through the stores (not the batch catalog) hosts the embedded Milvus
Lite, ``memetrace stats`` in another process connects to it and counts what it stored."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.services import free_port, wait_for_port

MEMETRACE = str(Path(sys.executable).with_name("memetrace"))
IMAGES, POSTS = 3, 2

# stores images and occurrences through the stores, prints "ready", holds the data dir until stdin closes
HOLDER = textwrap.dedent(f"""
    import sys
    import numpy as np
    from memetrace.cli.context import Context
    from memetrace.milvus import MilvusVectorIndex
    from memetrace.models import ImageRow, OccurrenceRow
    from memetrace.settings import Settings

    c = Context(Settings(_env_file=None, data_dir=sys.argv[1]))
    vec = lambda i: np.eye(8, dtype=np.float32)[i]
    MilvusVectorIndex(c.milvus, c.milvus_config, 8).upsert(
        [ImageRow(i, f"img{{i}}.jpg", 64, 64, 100, 10, vec(i), np.zeros((0, 8), np.float32)) for i in range({IMAGES})])
    c.occurrences.add_occurrences([OccurrenceRow(10 + i, i, f"post{{i}}", "", -1, "x", "") for i in range({POSTS})])
    print("ready", flush=True)
    sys.stdin.read()
""")


# joins the holder's Milvus Lite, counts, then (after "go" on stdin) counts again with retries
GUEST = textwrap.dedent("""
    import json, os, sys, time
    from memetrace.cli.context import Context
    from memetrace.errors import DependencyDown
    from memetrace.settings import Settings

    index = Context(Settings(_env_file=None, data_dir=sys.argv[1])).index
    print(index.count(), flush=True)
    sys.stdin.readline()
    failures = 0
    while True:
        try:
            count = index.count()
            break
        except DependencyDown:
            failures += 1
            time.sleep(0.5)
    print(json.dumps({"count": count, "failures": failures}), flush=True)
    sys.stdin.readline()  # holds on (and keeps its record) until the test is done
""")


def _env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEMETRACE_")}
    return {**env, "MEMETRACE_DATA_DIR": str(data)}


def _stats(data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MEMETRACE, "stats", "--json"], env=_env(data), capture_output=True, text=True,
                          timeout=120, cwd=data.parent)


@pytest.fixture()
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """A process that stored images through the stores and still holds the data dir."""
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data)], env=_env(data), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield data, proc
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=60)


def test_stats_in_another_process_counts_what_is_stored(holder: tuple[Path, subprocess.Popen]) -> None:
    data, proc = holder
    record = json.loads((data / "milvus.db.server.json").read_text())
    assert record["pid"] == proc.pid
    done = _stats(data)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["images"] == IMAGES and stats["occurrences"] == POSTS
    assert stats["stores"]["batch_catalog"]["images"] == 0  # counted from Milvus, not the batch catalog
    assert "bytes_per_image" in stats


def test_record_goes_with_its_process_and_a_stale_one_is_replaced(holder: tuple[Path, subprocess.Popen]) -> None:
    data, proc = holder
    record = data / "milvus.db.server.json"
    proc.stdin.close()  # type: ignore[union-attr]
    proc.wait(timeout=60)
    assert not record.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record.write_text(json.dumps({"pid": int(dead.stdout), "command": "gone", "uri": f"http://127.0.0.1:{free_port()}"}))
    done = _stats(data)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == IMAGES
    assert not record.exists()  # stats hosted it, and removed its record when it exited


def test_reset_is_refused_while_another_process_serves_the_data_dir(holder: tuple[Path, subprocess.Popen]) -> None:
    data, proc = holder
    done = subprocess.run([MEMETRACE, "reset", "--yes"], env=_env(data), capture_output=True, text=True,
                          timeout=120, cwd=data.parent)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by process {proc.pid}" in lines[0], done.stderr
    assert (data / "milvus.db").is_dir() and _stats(data).returncode == 0  # nothing deleted, still served


def test_a_holder_that_shares_nothing_is_named_at_once(tmp_path: Path) -> None:
    """Milvus Lite's LOCK held by a process that wrote no record (an older memetrace, another tool)."""
    data = tmp_path / "data"
    (data / "milvus.db").mkdir(parents=True)
    with open(data / "milvus.db" / "LOCK", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = _stats(data)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"is held by process {os.getpid()}" in lines[0] and "MEMETRACE_MILVUS_URI" in lines[0]


def test_a_guest_serves_the_data_dir_when_its_host_ends(holder: tuple[Path, subprocess.Popen]) -> None:
    """The host ends first: the guest's next call fails once as DependencyDown, its retry succeeds
    on the Milvus Lite it now serves itself."""
    data, proc = holder
    guest = subprocess.Popen([sys.executable, "-c", GUEST, str(data)], env=_env(data), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert guest.stdout is not None and guest.stdout.readline().strip() == str(IMAGES)
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=60)
        guest.stdin.write("go\n")  # type: ignore[union-attr]
        guest.stdin.flush()  # type: ignore[union-attr]
        after = json.loads(guest.stdout.readline())
        assert after["count"] == IMAGES and 1 <= after["failures"] <= 5
        assert json.loads((data / "milvus.db.server.json").read_text())["pid"] == guest.pid
    finally:
        guest.kill()
        guest.wait(timeout=60)


# hosts the data dir's Milvus Lite, then serves an empty app as `memetrace serve` does, until SIGTERM
SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import uvicorn
    from fastapi import FastAPI
    from memetrace.api.server import bind, run
    from memetrace.lite_server import shared_uri

    shared_uri(Path(sys.argv[1]) / "milvus.db")
    sock = bind("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    run(uvicorn.Server(uvicorn.Config(FastAPI(), log_config=None, lifespan="off")), sock)
""")


def test_a_server_stopped_by_sigterm_removes_its_record(tmp_path: Path) -> None:
    """uvicorn raises SIGTERM again after its graceful stop: the process must still exit through
    atexit (status 143), closing the Milvus Lite it hosts and removing its record."""
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(data)], env=_env(data), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert (data / "milvus.db.server.json").exists()
        wait_for_port(port, proc, 60, "the served app")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=60) as reply:
            assert reply.status == 200  # uvicorn runs (and has taken SIGTERM over)
        proc.terminate()
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (data / "milvus.db.server.json").exists()

