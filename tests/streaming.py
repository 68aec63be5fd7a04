"""Streaming test kit shared by the ingest, services and observability tests, on 127.0.0.1 only:
a photo HTTP server, a Milvus Lite server, per-test MEMETRACE_* settings (own topics, groups,
collections, data dir), producing posts and reading topics back.

Use it from a test module::

    from streaming import PhotoServer, milvus_server, photo_server  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import load_photo, make_settings
from kafka import KafkaConsumer, TopicPartition
from kafka_broker import Broker, free_port, stop_process, wait_for_port
from PIL import Image

from memetrace.cli.context import Context
from memetrace.cli.demo import GROUP_PHOTOS
from memetrace.cli.main import main as cli
from memetrace.settings import Settings

REPO = Path(__file__).resolve().parents[1]
MEMETRACE = str(Path(sys.executable).with_name("memetrace"))
SLOW_S = 0.3  # /slow/ responses: keep a batch in flight long enough to kill it


# ----------------------------------------------------------------------------- photo server


@dataclass
class PhotoServer:
    base: str
    jpegs: dict[str, bytes]
    gate: threading.Event = field(default_factory=threading.Event)  # /gated/ waits for it
    gated_hits: int = 0


@pytest.fixture(scope="module")
def photo_server() -> Iterator[PhotoServer]:
    """Real photos as JPEG, plus 404, 500, a text file, a truncated JPEG and a decompression bomb
    (a few KB of PNG declaring 8000 x 8000 pixels, above the default MEMETRACE_MAX_PIXELS);
    127.0.0.1 only."""
    jpegs = {}
    for name in GROUP_PHOTOS:
        buf = io.BytesIO()
        load_photo(name).save(buf, format="JPEG", quality=90)
        jpegs[name] = buf.getvalue()
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG", optimize=True)
    state = PhotoServer("", jpegs)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            kind, _, name = path.strip("/").partition("/")
            if kind == "slow":
                time.sleep(SLOW_S)
            elif kind == "gated":
                state.gated_hits += 1
                state.gate.wait(60)
            if kind in ("img", "slow", "gated") and name in jpegs:
                self._send(200, jpegs[name], "image/jpeg")
            elif kind == "truncated":
                self._send(200, jpegs["cat"][: len(jpegs["cat"]) // 2], "image/jpeg")
            elif kind == "bomb":
                self._send(200, bomb.getvalue(), "image/png")
            elif kind == "text":
                self._send(200, b"hello, this is not a picture\n" * 20, "text/plain")
            elif kind == "error":
                self._send(500, b"boom", "text/plain")
            else:
                self._send(404, b"no such thing", "text/plain")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    state.gate.set()
    server.shutdown()


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Milvus Lite in server mode (many processes, one Milvus): its URI."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("milvus-lite")), "server", "--data-dir",
                             str(tmp_path_factory.mktemp("milvus")), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, 60, "milvus-lite server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


# ----------------------------------------------------------------------------- helpers


def ingest_env(tmp: Path, broker: Broker, **extra: str) -> dict[str, str]:
    """MEMETRACE_* settings of one test: its own topics, group, collections and data dir."""
    tag = uuid.uuid4().hex[:8]
    env = {"MEMETRACE_DATA_DIR": str(tmp / "data"), "MEMETRACE_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
           "MEMETRACE_KAFKA_POSTS_TOPIC": f"posts-{tag}", "MEMETRACE_KAFKA_IMAGES_TOPIC": f"images-{tag}",
           "MEMETRACE_KAFKA_DEADLETTER_TOPIC": f"dead-{tag}", "MEMETRACE_KAFKA_INGEST_GROUP_ID": f"group-{tag}",
           "MEMETRACE_MILVUS_COLLECTION_PREFIX": f"t{tag}", "MEMETRACE_FETCH_ALLOW_PRIVATE_NETWORKS": "1",
           "MEMETRACE_FETCH_RETRIES": "1", "MEMETRACE_KAFKA_SESSION_TIMEOUT_MS": "2000",
           "MEMETRACE_KAFKA_TOPIC_PARTITIONS": "2", "MEMETRACE_INGEST_BATCH_SIZE": "4",
           "MEMETRACE_DEVICE": "cpu", "MEMETRACE_REGIONS": "0", "MEMETRACE_METRICS_PORT": "0"}
    env.update(extra)
    return env


def settings_from(env: dict[str, str]) -> Settings:
    fields = {k.removeprefix("MEMETRACE_").lower(): v for k, v in env.items()}
    return make_settings(Path(fields.pop("data_dir")), **fields)


def write_posts(path: Path, posts: list[dict | str]) -> Path:
    path.write_text("\n".join(p if isinstance(p, str) else json.dumps(p) for p in posts) + "\n")
    return path


def produce(env: dict[str, str], posts_file: Path) -> None:
    result = CliRunner().invoke(cli, ["produce", str(posts_file)], env=env)
    assert result.exit_code == 0, result.output


def read_topic(s: Settings, topic: str, expected: int, timeout: float = 20) -> list:
    """Every record of ``topic`` from the beginning (no group), waiting for ``expected`` of them."""
    consumer = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap_servers, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        out.extend(r for rs in consumer.poll(500).values() for r in rs)
    out.extend(r for rs in consumer.poll(500).values() for r in rs)  # anything beyond expected
    consumer.close()
    return out


def milvus_counts(s: Settings) -> dict:
    c = Context(s)  # the workers created the collections: their size is known
    ids = c.occurrences.image_ids_of_occurrences()
    out = {"images": c.index.count(), "occurrences": c.occurrences.count_occurrences(),
           "distinct_in_occurrences": len(set(ids)), "deadletters": c.occurrences.dead_letters_by_reason()}
    c.milvus.close()
    return out


class WorkerProcess:
    """``memetrace -v VERB --max-idle N ARGS`` with its JSON log lines collected as they come."""

    def __init__(self, env: dict[str, str], max_idle: float, name: str, verb: str = "ingest",
                 args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.lines: list[dict] = []
        self.proc = subprocess.Popen([MEMETRACE, "-v", verb, "--max-idle", str(max_idle), *args], cwd=REPO,
                                     env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                pass

    def logged(self, msg: str) -> int:
        return sum(1 for rec in self.lines if rec.get("msg") == msg)

    def wait_logged(self, msg: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.logged(msg) < count:
            assert self.proc.poll() is None, f"{self.name} exited ({self.proc.returncode}) before logging {msg!r}"
            assert time.monotonic() < deadline, f"{self.name} did not log {msg!r} within {timeout} s"
            time.sleep(0.05)

    def finish(self, timeout: float = 90) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        self._reader.join(timeout=5)
        assert self.proc.returncode == 0, f"{self.name} exited {self.proc.returncode}: {self.lines[-5:]}"
        return json.loads(out.strip().splitlines()[-1])
