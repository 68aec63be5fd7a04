"""``memetrace produce``: files of posts or URLs onto the posts topic.

``memetrace produce FILE`` turns each non-blank, non-# line of FILE into one message on the posts
topic: a JSON object is sent as-is (the worker validates it, so a bad one shows the dead-letter
path), a bare URL becomes ``{"post_id": "<file name>:<line number>", "url": URL}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from memetrace.kafka_clients import Message, ensure_topics, make_producer, publish
from memetrace.settings import Settings

log = logging.getLogger(__name__)


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
        messages: list[Message] = [(topic, k, v, []) for k, v in lines_to_messages(path)]
        publish(producer, messages)  # raises DependencyDown or Refused for a message that did not land
        log.info("produced", extra={"topic": topic, "count": len(messages), "file": str(path)})
        return len(messages)
    finally:
        producer.close()
