"""The streaming ingest against real services on 127.0.0.1: a Tansu broker, a photo HTTP server,
Milvus Lite (a file in-process; its server mode for worker subprocesses).

* end to end in-process: posts in -> occurrences, distinct images, events, dead letters; a second
  consumer group re-reading everything changes no count (redelivery is idempotent)
* kill -9 a ``memetrace ingest`` subprocess mid-batch, restart it: nothing lost, nothing doubled
* two worker subprocesses in one group split a 2-partition topic and store everything once
"""

from __future__ import annotations

import io
import json
import os
import signal
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
from kafka_broker import Broker, free_port, kafka_broker, stop_process, wait_for_port  # noqa: F401
from PIL import Image
from prometheus_client import CollectorRegistry

from ingest.messages import H_REASON, ImageEvent
from ingest.worker import IngestWorker
from memetrace.cli import main as cli
from memetrace.context import Context
from memetrace.demo import GROUP_PHOTOS
from memetrace.kafka_clients import ensure_topics
from memetrace.metrics import IngestMetrics
from memetrace.milvus_store import MilvusStore, connect, stored_dim
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
           "MEMETRACE_KAFKA_DEADLETTER_TOPIC": f"dead-{tag}", "MEMETRACE_KAFKA_GROUP_ID": f"group-{tag}",
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
    client = connect(s)
    store = MilvusStore(s, stored_dim(client, s) or 1, client)
    ids = store.image_ids_of_occurrences()
    out = {"images": store.count(), "occurrences": store.count_occurrences(), "distinct_in_occurrences": len(set(ids)),
           "deadletters": store.deadletters_by_reason()}
    client.close()
    return out


# ----------------------------------------------------------------------------- end to end, in-process


def test_end_to_end_posts_to_milvus_events_and_deadletters(kafka_broker: Broker, photo_server: PhotoServer,
                                                         embedder, tmp_path: Path) -> None:
    env = ingest_env(tmp_path, kafka_broker)
    s = settings_from(env)
    base = photo_server.base
    names = list(GROUP_PHOTOS)
    posts: list[dict | str] = [{"post_id": f"p{i}", "url": f"{base}/img/{names[i % 6]}", "platform": "x",
                                "author": f"u{i}", "posted_at": f"2024-01-0{1 + i % 9}T00:00:00Z"} for i in range(18)]
    posts.append({"post_id": "same-bytes-other-url", "url": f"{base}/img/cat?copy=1"})
    posts.append(f"{base}/img/coffee")  # a bare URL line: the producer wraps it
    posts += [{"post_id": "gone", "url": f"{base}/missing.jpg"}, {"post_id": "err", "url": f"{base}/error/x"},
              {"post_id": "txt", "url": f"{base}/text/a.jpg"}, {"post_id": "cut", "url": f"{base}/truncated/x"},
              {"post_id": "bomb", "url": f"{base}/bomb/x.png"}, "{this is not json", {"post_id": "no-url"}, {"post_id": "ftp", "url": "ftp://127.0.0.1/x.jpg"}]
    produce(env, write_posts(tmp_path / "posts.txt", posts))

    def run_worker(settings: Settings) -> IngestWorker:
        ctx = Context(settings)
        ctx.__dict__["embedder"] = embedder  # the session's model: no second 3 s load
        ensure_topics(settings, [settings.kafka_images_topic, settings.kafka_deadletter_topic])
        worker = IngestWorker(ctx, IngestMetrics(CollectorRegistry()))
        worker.run(max_idle=3)
        ctx.store.client.close()
        return worker

    worker = run_worker(s)
    t = worker.totals
    assert (t.posts, t.occurrences, t.new_images, t.duplicates) == (28, 20, 6, 14)
    expected_dead = {"download_http_404": 1, "download_http_5xx": 1, "download_not_an_image": 1, "image_corrupt": 1,
                     "image_too_many_pixels": 1, "invalid_json": 1, "invalid_post": 2}
    assert t.deadlettered == expected_dead
    counts = milvus_counts(s)
    assert counts == {"images": 6, "occurrences": 20, "distinct_in_occurrences": 6, "deadletters": expected_dead}

    events = [ImageEvent.model_validate_json(r.value) for r in read_topic(s, s.kafka_images_topic, 20)]
    assert len(events) == 20 and sum(e.new_image for e in events) == 6
    assert {e.post.post_id for e in events} >= {f"p{i}" for i in range(18)}
    assert all((s.data_dir / "features" / e.features.keypoints).is_file() for e in events)
    dead = read_topic(s, s.kafka_deadletter_topic, 8)
    assert len(dead) == 8
    assert b"{this is not json" in {r.value for r in dead}  # the original bytes, untouched
    assert {dict(r.headers)[H_REASON].decode() for r in dead} == set(expected_dead)
    metrics = worker.metrics.registry
    assert metrics.get_sample_value("memetrace_posts_consumed_total") == 28
    assert metrics.get_sample_value("memetrace_download_failures_total", {"reason": "http_404"}) == 1
    assert metrics.get_sample_value("memetrace_embed_batch_seconds_count") >= 1

    # a second group re-reads every message: rows are keyed by content/position, nothing doubles
    again = run_worker(s.model_copy(update={"kafka_group_id": s.kafka_group_id + "-again"}))
    assert again.totals.posts == 28 and again.totals.new_images == 0
    assert milvus_counts(s) == counts


# ----------------------------------------------------------------------------- subprocess workers


class WorkerProcess:
    """``memetrace -v ingest --max-idle N`` with its JSON log lines collected as they come."""

    def __init__(self, env: dict[str, str], max_idle: float, name: str) -> None:
        self.name = name
        self.lines: list[dict] = []
        self.proc = subprocess.Popen([MEMETRACE, "-v", "ingest", "--max-idle", str(max_idle)], cwd=REPO,
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


def test_kill_9_mid_batch_then_restart_loses_and_doubles_nothing(
        kafka_broker: Broker, photo_server: PhotoServer, milvus_server: str, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    env = ingest_env(tmp_path, kafka_broker, MEMETRACE_MILVUS_URI=milvus_server)
    s = settings_from(env)
    names = list(GROUP_PHOTOS)
    n = 24  # 6 batches of 4; distinct URLs (each download takes SLOW_S), 6 distinct images
    produce(env, write_posts(tmp_path / "posts.txt", [
        {"post_id": f"k{i}", "url": f"{photo_server.base}/slow/{names[i % 6]}?n={i}"} for i in range(n)]))

    first = WorkerProcess(env, max_idle=30, name="first worker")
    first.wait_logged("batch stored", 1, timeout=90)
    time.sleep(SLOW_S)  # the next batch is downloading
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    at_kill = milvus_counts(s)["occurrences"]
    batches_logged = first.logged("batch stored")
    assert at_kill < n, "the first worker finished everything before the kill: nothing was tested"

    # the restart runs until told to stop: SIGTERM once everything is in, it must exit 0 cleanly
    second = WorkerProcess(env, max_idle=60, name="restarted worker")
    deadline = time.monotonic() + 90
    while milvus_counts(s)["occurrences"] < n and time.monotonic() < deadline and second.proc.poll() is None:
        time.sleep(0.5)
    second.wait_logged("batch stored", 1, timeout=10)
    second.proc.send_signal(signal.SIGTERM)
    totals = second.finish()
    assert totals["stopped_by"] == "SIGTERM"
    counts = milvus_counts(s)
    assert counts["occurrences"] == n and counts["images"] == 6 and counts["distinct_in_occurrences"] == 6
    assert counts["deadletters"] == {}
    # the restart re-read what was never committed: at least the posts missing at kill time
    assert n - at_kill <= totals["posts"] <= n
    result = CliRunner().invoke(cli, ["stats", "--json"], env=env)
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["occurrences"] == n and stats["deadlettered"] == 0
    with capsys.disabled():
        print(f"\n[kill -9] {batches_logged} batch(es) stored before the kill, {at_kill}/{n} occurrences in Milvus; "
              f"the restart consumed {totals['posts']} posts (all never committed, the killed in-flight batch "
              f"included), "
              f"final: {counts['occurrences']} occurrences, {counts['images']} images")


def test_two_workers_split_partitions_and_store_everything_once(
        kafka_broker: Broker, photo_server: PhotoServer, milvus_server: str, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    env = ingest_env(tmp_path, kafka_broker, MEMETRACE_MILVUS_URI=milvus_server)
    s = settings_from(env)
    ensure_topics(s, [s.kafka_posts_topic], partitions=2)
    names = list(GROUP_PHOTOS)
    n = 32
    produce(env, write_posts(tmp_path / "posts.txt", [
        {"post_id": f"w{i}", "url": f"{photo_server.base}/gated/{names[i % 6]}?n={i}"} for i in range(n)]))

    photo_server.gate.clear()
    photo_server.gated_hits = 0
    a = WorkerProcess(env, max_idle=8, name="worker A")
    try:
        # A owns both partitions and is stuck downloading its first batch until the gate opens
        a.wait_logged("partitions assigned", timeout=90)
        deadline = time.monotonic() + 30
        while photo_server.gated_hits == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        b = WorkerProcess(env, max_idle=8, name="worker B")
        b.wait_logged("ingest started", timeout=90)  # B subscribes now: its join reaches the group
        time.sleep(0.5)
    finally:
        photo_server.gate.set()
    ta, tb = a.finish(), b.finish()
    counts = milvus_counts(s)
    story = [(w.name, round(r["time"] % 1000, 2), r["msg"], r.get("partitions", r.get("records", "")))
             for w in (a, b) for r in w.lines if r["logger"].startswith("ingest")]
    assert counts["occurrences"] == n, "\n".join(map(str, [ta, tb, *sorted(story, key=lambda x: x[1])]))
    assert counts["images"] == 6 and counts["distinct_in_occurrences"] == 6
    assert ta["posts"] > 0 and tb["posts"] > 0, (ta, tb)
    assert ta["posts"] + tb["posts"] >= n
    assert len(tb["partitions"]) >= 1
    with capsys.disabled():
        print(f"\n[two workers] A: {ta['posts']} posts, partitions {ta['partitions']}; "
              f"B: {tb['posts']} posts, partitions {tb['partitions']}; Milvus: {counts['occurrences']} occurrences")
