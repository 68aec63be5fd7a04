"""Milvus goes down under a running ``memetrace ingest`` worker, then comes back.

Real services on 127.0.0.1 only: the Tansu broker, the photo HTTP server of test_ingest_worker, and
a Milvus Lite server of this test's own (it is SIGKILLed and restarted on the same port and data dir).

The worker holds its first batch in download (the /gated/ URLs) while Milvus is killed; once the
gate opens every Milvus call of the batch fails. It must keep retrying with backoff (not exit), and
commit no offset for the unwritten posts. After the restart it must resume by itself and end with
every post stored once: occurrences == posts, 6 distinct images, no dead letters.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka_broker import Broker, kafka_broker  # noqa: F401
from streaming import (  # noqa: F401
    PhotoServer,
    WorkerProcess,
    ingest_env,
    milvus_counts,
    photo_server,
    produce,
    settings_from,
    write_posts,
)

from benchmarks.services import free_port, start_milvus_lite, stop_process
from memetrace.cli.demo import GROUP_PHOTOS


def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """Sum over ``topic``'s partitions of the offsets ``group`` committed (0 before its first commit).

    The consumer only fetches offsets (OffsetFetch): it subscribes to nothing, so it joins no group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.committed(tp) or 0 for tp in parts)
    finally:
        consumer.close(autocommit=False)


def wait_until(what: str, check, timeout: float, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert worker.proc.poll() is None, f"{worker.name} exited ({worker.proc.returncode}) waiting for {what}: " \
                                           f"{worker.lines[-5:]}"
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}; the worker's last log lines: " + \
            "; ".join(f"{r.get('msg')} {r.get('target', '')} {str(r.get('error', ''))[:160]}" for r in worker.lines[-6:])
        time.sleep(0.1)


def test_milvus_down_then_back_worker_retries_commits_nothing_then_stores_everything_once(
        kafka_broker: Broker, photo_server: PhotoServer, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture) -> None:
    t_start = time.monotonic()
    milvus_dir, port = tmp_path / "milvus", free_port()
    milvus, uri = start_milvus_lite(milvus_dir, port)
    worker: WorkerProcess | None = None
    try:
        env = ingest_env(tmp_path, kafka_broker, MEMETRACE_MILVUS_URI=uri, MEMETRACE_RETRY_MAX_S="1")
        s = settings_from(env)
        names = list(GROUP_PHOTOS)
        n = 12  # 3 batches of 4; distinct URLs, 6 distinct images
        produce(env, write_posts(tmp_path / "posts.txt", [
            {"post_id": f"o{i}", "url": f"{photo_server.base}/gated/{names[i % 6]}?n={i}"} for i in range(n)]))

        photo_server.gate.clear()
        photo_server.gated_hits = 0
        try:
            worker = WorkerProcess(env, max_idle=60, name="worker")
            # the worker holds its first batch in download: Milvus dies before it writes anything
            wait_until("the first gated download", lambda: photo_server.gated_hits > 0, 90, worker)
            stop_process(milvus)  # SIGKILL
        finally:
            photo_server.gate.set()

        wait_until("3 failed Milvus writes", lambda: worker.logged("write failed, retrying") >= 3, 30, worker)
        time.sleep(1.5)  # a few more backoff rounds
        retries_while_down = worker.logged("write failed, retrying")
        assert worker.proc.poll() is None, "the worker exited while Milvus was down"
        assert worker.logged("batch stored") == 0
        committed_down = committed_total(kafka_broker.bootstrap, s.kafka_ingest_group_id, s.kafka_posts_topic)
        assert committed_down == 0, f"offsets committed while Milvus was down: {committed_down}/{n}"
        milvus_retries = [r for r in worker.lines if r.get("msg") == "write failed, retrying"]
        assert all(r.get("target") == "milvus" for r in milvus_retries), milvus_retries[-3:]

        milvus, uri_again = start_milvus_lite(milvus_dir, port)  # same port, same data
        assert uri_again == uri
        t_back = time.monotonic()
        wait_until(f"all {n} offsets committed after the restart",
                   lambda: committed_total(kafka_broker.bootstrap, s.kafka_ingest_group_id, s.kafka_posts_topic) >= n, 60, worker)
        resumed_s = time.monotonic() - t_back
        worker.proc.send_signal(signal.SIGTERM)
        totals = worker.finish(timeout=30)
        assert totals["stopped_by"] == "SIGTERM"
        assert totals["posts"] == n and totals["occurrences"] == n, totals  # no crash: nothing redelivered
        # Milvus is the truth (below). The worker's own count of new images is what it found absent
        # from the index: a batch retried record by record after a partial write (a restart's first
        # writes can fail while the ping answers) counts the images it had written as duplicates
        assert totals["new_images"] + totals["duplicates"] == n and totals["new_images"] <= 6, totals
        assert totals["deadlettered"] == {}, totals
        counts = milvus_counts(s)
        assert counts == {"images": 6, "occurrences": n, "distinct_in_occurrences": 6, "deadletters": {}}, counts
        assert committed_total(kafka_broker.bootstrap, s.kafka_ingest_group_id, s.kafka_posts_topic) == n
        with capsys.disabled():
            print(f"\n[milvus outage] {retries_while_down} retries while down, committed {committed_down}/{n}; "
                  f"all {n} committed {resumed_s:.1f} s after the restart; final: {counts['occurrences']} "
                  f"occurrences, {counts['images']} images ({time.monotonic() - t_start:.0f} s in all)")
    finally:
        photo_server.gate.set()
        if worker is not None and worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=10)
        stop_process(milvus)
