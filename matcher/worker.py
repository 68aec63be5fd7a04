"""The matcher service: ``memetrace match``.

One member of the consumer group ``kafka_match_group_id`` on ``memetrace.images``::

    poll ≤ match_batch_size image events
      ▼
    distinct image ids not matched recently (a viral image arrives once per post)
      ▼
    Matcher.match_stored: Milvus candidates (whole and regions, both directions, against
    everything stored) → FAISS ratio test → RANSAC → coverage: verified edges
      ▼
    publish each edge on memetrace.matches ── producer.flush() ──► commit offsets

Every pair is found by at least one side: an image is stored before its event is published,
so of two images the one matched later sees the other. Redelivery re-publishes identical edges
(keyed by pair), which the clusterer stores once.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from memetrace.messages import ImageEvent
from memetrace.matcher.matching import Matcher
from memetrace.messages import MatchEvent
from memetrace.cli.context import Context
from memetrace.feature_store import FeatureStore
from memetrace.kafka_clients import ensure_topics, make_producer
from memetrace.matcher.metrics import MatchMetrics
from memetrace.milvus_store import MilvusStore
from memetrace.settings import Settings
from memetrace.stream import StreamWorker, run_service

log = logging.getLogger(__name__)

RECENT = 100_000  # image ids remembered as matched; a restart forgets them (matching again is harmless)


class MatchWorker(StreamWorker):
    """Verifies the copies of each new image and publishes them; see the module docstring."""

    name = "match"

    def __init__(self, settings: Settings, store: MilvusStore, features: FeatureStore, metrics: MatchMetrics,
                 producer: KafkaProducer | None = None, consumer: KafkaConsumer | None = None) -> None:
        s = settings
        super().__init__(s, metrics, [s.kafka_images_topic], s.kafka_match_group_id, s.match_batch_size, consumer,
                         store=store)
        self.metrics: MatchMetrics = metrics
        self.matcher = Matcher(s, store, features)
        self.producer = producer or make_producer(s)
        self.recent: OrderedDict[int, None] = OrderedDict()
        self.matched = 0
        self.published = 0

    def close(self) -> None:
        self.producer.close(timeout=10)

    def process(self, records: Sequence[ConsumerRecord]) -> None:
        todo = [i for i in dict.fromkeys(self._image_ids(records)) if i not in self.recent]
        if not todo:
            return
        t0 = time.perf_counter()
        matches = self.retry("milvus", lambda: self.matcher.match_stored(todo))
        per_image = (time.perf_counter() - t0) / len(todo)
        events = [MatchEvent.of(m) for m in matches]
        self.retry("kafka", lambda: self._publish(events))
        for image_id in todo:
            self.metrics.match_seconds.observe(per_image)
            self.recent[image_id] = None
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        self.metrics.images_matched.inc(len(todo))
        self.matched += len(todo)
        for e in events:
            self.metrics.matches.labels(e.kind).inc()
        self.published += len(events)
        log.info("images matched", extra={"images": len(todo), "edges": len(events),
                                          "seconds_per_image": round(per_image, 4)})

    def _image_ids(self, records: Sequence[ConsumerRecord]) -> list[int]:
        ids = []
        for r in records:
            try:
                ids.append(ImageEvent.model_validate_json(r.value or b"").image_id)
            except ValidationError as exc:  # not ours to fix here: the ingest writes this topic
                log.warning("not an image event, skipped", extra={
                    "source": f"{r.topic}/{r.partition}/{r.offset}", "error": str(exc)[:500]})
        return ids

    def _publish(self, events: list[MatchEvent]) -> None:
        topic = self.s.kafka_matches_topic
        futures = [self.producer.send(topic, key=e.key(), value=e.to_bytes()) for e in events]
        self.producer.flush()
        for fut in futures:
            fut.get(timeout=30)
