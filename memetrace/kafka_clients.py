"""Kafka clients every memetrace service shares: connection settings, a durable producer, topics,
and :func:`publish`, which turns Kafka's errors into the two a consume loop acts on:
:class:`DependencyDown` ("kafka", retried with backoff) and :class:`Refused` (this message can never
be sent, e.g. over ``max_request_size``: dead-lettered as poison)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (
    InvalidRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)

from memetrace.errors import DependencyDown, Refused
from memetrace.settings import Settings

log = logging.getLogger(__name__)


def client_config(s: Settings) -> dict[str, Any]:
    """Connection settings every Kafka client of memetrace shares."""
    return {"bootstrap_servers": [b.strip() for b in s.kafka_bootstrap_servers.split(",") if b.strip()],
            "client_id": "memetrace"}


def make_producer(s: Settings) -> KafkaProducer:
    """:func:`durable_producer` on the brokers of ``s``."""
    return durable_producer(client_config(s))


def durable_producer(client: Mapping[str, Any]) -> KafkaProducer:
    """Durable producer: every send waits for all in-sync replicas; retries keep order per partition.
    A send blocks at most 10 s for a broker (not kafka-python's 60 s): the consume loop's retry then
    reports the outage (readiness red) and backs off. ``client``: :func:`client_config`."""
    return KafkaProducer(**client, acks="all", retries=5, linger_ms=5,
                         max_in_flight_requests_per_connection=1, max_block_ms=10_000)


#: (topic, key, value, headers) of one record to send
Message = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]
SEND_TIMEOUT_S = 10  # like max_block_ms: an outage shows (readiness red) within seconds
_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError)


def kafka_error(exc: BaseException) -> DependencyDown | Refused | None:
    """What a Kafka client error means to a consume loop; None when it is neither (a bug or a
    configuration error: let it stop the worker)."""
    if isinstance(exc, _REFUSED):
        return Refused("kafka", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, KafkaError) and exc.retriable:
        return DependencyDown("kafka", f"{type(exc).__name__}: {exc}")
    return None


def publish(producer: KafkaProducer, messages: Sequence[Message]) -> None:
    """Send ``messages``, flush, and return once the broker acknowledged every one of them."""
    try:
        futures = [producer.send(topic, key=key, value=value, headers=headers or None)
                   for topic, key, value, headers in messages]
        producer.flush(timeout=SEND_TIMEOUT_S)
        for fut in futures:
            fut.get(timeout=SEND_TIMEOUT_S)
    except KafkaError as exc:
        meant = kafka_error(exc)
        if meant is None:
            raise
        raise meant from exc


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
