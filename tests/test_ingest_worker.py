"""The streaming ingest against real services on 127.0.0.1: a Tansu broker, a photo HTTP server,
Milvus Lite (a file in-process; its server mode for worker subprocesses).

* end to end in-process: posts in -> occurrences, distinct images, events, dead letters; a second
  consumer group re-reading everything changes no count (redelivery is idempotent)
* kill -9 a ``memetrace ingest`` subprocess mid-batch, restart it: nothing lost, nothing doubled
* two worker subprocesses in one group split a 2-partition topic and store everything once
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from kafka_broker import Broker, kafka_broker  # noqa: F401
from prometheus_client import CollectorRegistry
from streaming import (  # noqa: F401
    SLOW_S,
    PhotoServer,
    WorkerProcess,
    ingest_env,
    milvus_counts,
    milvus_server,
    photo_server,
    produce,
    read_topic,
    settings_from,
    write_posts,
)

from memetrace.messages import H_DETAIL, H_REASON, MAX_META_KEYS, ImageEvent
from memetrace.ingest.worker import IngestWorker
from memetrace.cli.main import main as cli
from memetrace.cli.context import Context
from memetrace.cli.services import ingest_worker
from memetrace.cli.demo import GROUP_PHOTOS
from memetrace.kafka_clients import ensure_topics
from memetrace.ingest.metrics import IngestMetrics
from memetrace.settings import Settings

# ----------------------------------------------------------------------------- end to end, in-process


def test_end_to_end_posts_to_milvus_events_and_deadletters(kafka_broker: Broker, photo_server: PhotoServer,
                                                         embedder, tmp_path: Path) -> None:
    env = ingest_env(tmp_path, kafka_broker)
    s = settings_from(env)
    base = photo_server.base
    names = list(GROUP_PHOTOS)
    posts: list[dict | str] = [{"post_id": f"p{i}", "url": f"{base}/img/{names[i % 6]}", "platform": "x",
                                "author": f"u{i}", "posted_at": f"2024-01-0{1 + i % 9}T00:00:00Z"} for i in range(18)]
    posts[0]["meta"] = {"likes": 3, "caption": "first ☕"}  # a number is kept as its text
    posts.append({"post_id": "same-bytes-other-url", "url": f"{base}/img/cat?copy=1"})
    posts.append(f"{base}/img/coffee")  # a bare URL line: the producer wraps it
    posts += [{"post_id": "gone", "url": f"{base}/missing.jpg"}, {"post_id": "err", "url": f"{base}/error/x"},
              {"post_id": "txt", "url": f"{base}/text/a.jpg"}, {"post_id": "cut", "url": f"{base}/truncated/x"},
              {"post_id": "bomb", "url": f"{base}/bomb/x.png"}, "{this is not json", {"post_id": "no-url"}, {"post_id": "ftp", "url": "ftp://127.0.0.1/x.jpg"},
              {"post_id": "meta-keys", "url": f"{base}/img/cat", "meta": {f"k{i}": "v" for i in range(MAX_META_KEYS + 1)}}]
    produce(env, write_posts(tmp_path / "posts.txt", posts))

    def run_worker(settings: Settings) -> IngestWorker:
        ctx = Context(settings, embedder=embedder)  # the session's model: no second 3 s load
        ensure_topics(settings, [settings.kafka_images_topic, settings.kafka_deadletter_topic])
        worker = ingest_worker(ctx, IngestMetrics(CollectorRegistry()))
        worker.run(max_idle=3)
        ctx.milvus.close()
        return worker

    worker = run_worker(s)
    t = worker.totals
    assert (t.posts, t.occurrences, t.new_images, t.duplicates) == (29, 20, 6, 14)
    expected_dead = {"download_http_404": 1, "download_http_5xx": 1, "download_not_an_image": 1, "image_corrupt": 1,
                     "image_too_many_pixels": 1, "invalid_json": 1, "invalid_post": 3}
    assert t.deadlettered == expected_dead
    counts = milvus_counts(s)
    assert counts == {"images": 6, "occurrences": 20, "distinct_in_occurrences": 6, "deadletters": expected_dead}

    events = [ImageEvent.model_validate_json(r.value) for r in read_topic(s, s.kafka_images_topic, 20)]
    assert len(events) == 20 and len({e.image_id for e in events}) == 6
    assert {e.post.post_id for e in events} >= {f"p{i}" for i in range(18)}
    stored = Context(s)
    assert all(stored.features.get_keypoints(e.image_id) is not None for e in events)
    meta = {o.post_id: o.meta for o in stored.occurrences.occurrences_of([e.image_id for e in events])}
    assert meta["p0"] == {"likes": "3", "caption": "first ☕"} and meta["p1"] == {}  # without meta: as before
    assert "meta-keys" not in meta
    stored.close()
    dead = read_topic(s, s.kafka_deadletter_topic, 9)
    assert len(dead) == 9
    (too_many,) = [r for r in dead if b'"meta-keys"' in r.value]
    assert dict(too_many.headers)[H_REASON] == b"invalid_post"
    assert dict(too_many.headers)[H_DETAIL].startswith(b"meta: Dictionary should have at most 32 items")
    assert b"{this is not json" in {r.value for r in dead}  # the original bytes, untouched
    assert {dict(r.headers)[H_REASON].decode() for r in dead} == set(expected_dead)
    metrics = worker.metrics.registry
    assert metrics.get_sample_value("memetrace_posts_consumed_total") == 29
    assert metrics.get_sample_value("memetrace_download_failures_total", {"reason": "http_404"}) == 1
    assert metrics.get_sample_value("memetrace_embed_batch_seconds_count") >= 1

    # a second group re-reads every message: rows are keyed by content/position, nothing doubles
    again = run_worker(s.model_copy(update={"kafka_ingest_group_id": s.kafka_ingest_group_id + "-again"}))
    assert again.totals.posts == 29 and again.totals.new_images == 0
    assert milvus_counts(s) == counts


# ----------------------------------------------------------------------------- subprocess workers


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
