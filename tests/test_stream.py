"""The shared consume loop (memetrace/stream.py) on a real broker (Tansu on 127.0.0.1)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

from conftest import make_settings
from kafka.consumer.fetcher import ConsumerRecord
from kafka_broker import Broker, kafka_broker  # noqa: F401
from prometheus_client import CollectorRegistry

from memetrace.kafka_clients import ensure_topics, make_producer
from memetrace.metrics import StreamMetrics
from memetrace.stream import StreamConfig, StreamWorker


class Recorder(StreamWorker):
    name = "recorder"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.values: list[bytes] = []

    def process(self, records: Sequence[ConsumerRecord]) -> None:
        self.values.extend(r.value for r in records)


def test_max_idle_counts_from_joining_the_group(kafka_broker: Broker, tmp_path: Path) -> None:
    """Joining a group takes seconds (~5 s on Tansu): a 1 s --max-idle must not quit before reading."""
    tag = uuid.uuid4().hex[:8]
    s = make_settings(tmp_path, kafka_bootstrap_servers=kafka_broker.bootstrap)
    topic = f"stream-{tag}"
    ensure_topics(s, [topic], partitions=1)
    producer = make_producer(s)
    for i in range(3):
        producer.send(topic, value=f"m{i}".encode())
    producer.flush()
    producer.close()
    worker = Recorder(StreamConfig.from_settings(s), StreamMetrics(CollectorRegistry()), [topic], f"group-{tag}", 10)
    worker.run(max_idle=1.0)
    assert worker.stopped_by == "max_idle"
    assert sorted(worker.values) == [b"m0", b"m1", b"m2"]
    assert worker.partitions == {f"{topic}/0"}
