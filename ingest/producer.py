"""Kafka plumbing shared by the ingest worker and ``memetrace produce``.

``memetrace produce FILE`` turns each non-blank, non-# line of FILE into one message on the posts
topic: a JSON object is sent as-is (the worker validates it, so a bad one shows the dead-letter
path), a bare URL becomes ``{"post_id": "<file name>:<line number>", "url": URL}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from memetrace.settings import Settings

log = logging.getLogger(__name__)


def client_config(s: Settings) -> dict[str, Any]:
    """Connection settings every Kafka client of memetrace shares."""
    return {"bootstrap_servers": [b.strip() for b in s.kafka_bootstrap_servers.split(",") if b.strip()],
            "client_id": "memetrace"}


def make_producer(s: Settings) -> KafkaProducer:
    """Durable producer: every send waits for all in-sync replicas; retries keep order per partition."""
    return KafkaProducer(**client_config(s), acks="all", retries=5, linger_ms=5,
                         max_in_flight_requests_per_connection=1)


def ensure_topics(s: Settings, topics: list[str], partitions: int | None = None) -> list[str]:
    """Create the missing ``topics`` (``kafka_topic_partitions`` each); returns those created."""
    admin = KafkaAdminClient(**client_config(s))
    try:
        missing = [t for t in topics if t not in set(admin.list_topics())]
        created = []
        for topic in missing:
            try:
                admin.create_topics([NewTopic(topic, partitions or s.kafka_topic_partitions, 1)])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass  # another worker won the race
        if created:
            log.info("topics created", extra={"topics": created})
        return created
    finally:
        admin.close()


def lines_to_messages(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) per line of ``path``: JSON posts kept verbatim, bare URLs wrapped into a post."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            if line.startswith(b"{"):
                yield _key_of(line, f"{path.name}:{number}"), line
            else:
                post_id = f"{path.name}:{number}"
                url = line.decode("utf-8", errors="replace")
                yield post_id.encode(), json.dumps({"post_id": post_id, "url": url}).encode()


def _key_of(value: bytes, fallback: str) -> bytes:
    try:
        doc = json.loads(value)
        return str(doc["post_id"]).encode() if isinstance(doc, dict) and "post_id" in doc else fallback.encode()
    except (ValueError, UnicodeDecodeError):
        return fallback.encode()


def produce_file(s: Settings, path: Path, topic: str | None = None) -> int:
    """Send every line of ``path`` to ``topic`` (default: the posts topic); returns the count sent."""
    topic = topic or s.kafka_posts_topic
    ensure_topics(s, [topic])
    producer = make_producer(s)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in lines_to_messages(path)]
        producer.flush()
        for fut in futures:
            fut.get(timeout=30)  # raises the broker's error for a message that did not land
        log.info("produced", extra={"topic": topic, "count": len(futures), "file": str(path)})
        return len(futures)
    finally:
        producer.close()
