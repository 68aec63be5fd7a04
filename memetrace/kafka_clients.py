"""Kafka clients every memetrace service shares: connection settings, a durable producer, topics."""

from __future__ import annotations

import logging
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
