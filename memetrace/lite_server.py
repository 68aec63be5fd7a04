"""One embedded Milvus Lite per data dir, shared by every memetrace process that uses it.

Milvus Lite keeps its data in a folder (``DATA_DIR/milvus.db``) that one process at a time may open
(it holds the folder's ``LOCK``). The first memetrace process that needs it opens it, serves it on
127.0.0.1 (Milvus Lite's in-process gRPC server: what pymilvus starts for a file URI anyway) and
records ``{pid, command, uri}`` next to it (``milvus.db.server.json``); later processes read the
record and connect to that address instead of opening the folder. A record whose process is gone,
or whose address no longer answers, is stale: it is removed and the folder opened again. A short
``flock`` (``milvus.db.server.lock``) orders processes that start together; the host removes its
record when it exits.

Limit: the host serves only while it runs, so a process connected to it loses Milvus when the host
exits (its calls then fail as DependencyDown). Start the long-running command (``serve``,
``ingest``) first, or run a Milvus server and set ``MEMETRACE_MILVUS_URI`` (docs/DESIGN.md).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from memetrace.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
_HOSTED: dict[Path, str] = {}  # folder -> URI of the servers this process runs


def record_path(db: Path) -> Path:
    return db.with_name(db.name + ".server.json")


def shared_uri(db: Path) -> str:
    """The http:// URI of the Milvus Lite serving folder ``db``: this process', another memetrace
    process' (read from its record) or one started here. ConfigError when another process holds the
    folder and serves it to no one."""
    db = db.absolute()
    if db in _HOSTED:
        return _HOSTED[db]
    db.parent.mkdir(parents=True, exist_ok=True)
    record = record_path(db)
    with _flock(db.with_name(db.name + ".server.lock")):
        held = _read(record)
        if held and _answers(held):
            return str(held["uri"])
        if held:
            log.info("stale Milvus Lite record removed", extra={"record": str(record), "pid": held.get("pid")})
            record.unlink(missing_ok=True)
        uri = _host(db, held)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "command": _command(), "uri": uri}))
        os.replace(tmp, record)
        atexit.register(_forget, record)
        return uri


def other_host(db: Path) -> str | None:
    """Another live process serving folder ``db``, in words (``process PID (command)``); None if none."""
    db = db.absolute()
    held = _read(record_path(db))
    if not held or held.get("pid") == os.getpid() or not _answers(held):
        return None
    return _holder(db, held)


def _host(db: Path, held: dict | None) -> str:
    from milvus_lite.adapter.grpc.server import start_server_in_thread
    from milvus_lite.exceptions import DataDirLockedError

    try:
        server, lite, port = start_server_in_thread(data_dir=str(db), host="127.0.0.1", port=0)
    except DataDirLockedError as exc:
        raise ConfigError(f"{db} is held by {_holder(db, held)}: wait for it to end or stop it, or run a Milvus "
                          "server for several processes and set MEMETRACE_MILVUS_URI") from exc
    uri = f"http://127.0.0.1:{port}"
    _HOSTED[db] = uri

    def stop() -> None:
        server.stop(grace=1)
        lite.close()

    atexit.register(stop)  # atexit runs last-registered first: the record goes before the server stops
    log.info("Milvus Lite served for the other memetrace processes", extra={"folder": str(db), "uri": uri})
    return uri


def _holder(db: Path, held: dict | None) -> str:
    """Who holds the folder's LOCK, in words: from the kernel's lock table, else from the stale record."""
    pid = _lock_owner(db / "LOCK") or (held or {}).get("pid")
    if not pid:
        return "another process"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = str((held or {}).get("command", "?"))
    return f"process {pid} ({' '.join(command.split())[:120]})"  # one line: `python -c` scripts hold newlines


def _lock_owner(lock: Path) -> int | None:
    """The pid holding a flock on ``lock`` (Linux /proc/locks), None when unknown."""
    try:
        inode = lock.stat().st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        fields = line.split()  # "1: FLOCK ADVISORY WRITE 1234 08:01:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4])
    return None


def _answers(held: dict) -> bool:
    """The recorded process runs and its address accepts connections."""
    try:
        os.kill(int(held["pid"]), 0)
        url = urlsplit(str(held["uri"]))
        socket.create_connection((url.hostname, url.port), timeout=PROBE_TIMEOUT_S).close()
    except PermissionError:
        return True  # another user's live process: its port was answering when recorded
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return True


def _read(record: Path) -> dict | None:
    try:
        held = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def _forget(record: Path) -> None:
    """Remove the record if it is still this process'."""
    held = _read(record)
    if held and held.get("pid") == os.getpid():
        record.unlink(missing_ok=True)


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
