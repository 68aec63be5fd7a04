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

An event that is not a valid :class:`ImageEvent` (bad JSON, an id out of range...) is
dead-lettered by the consume loop; so is one whose matching keeps failing while Milvus answers
(poison: see :mod:`memetrace.stream`).

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

from memetrace.feature_store import FeatureStore
from memetrace.matcher.matching import MatchConfig, Matcher
from memetrace.matcher.metrics import MatchMetrics
from memetrace.messages import ImageEvent, MatchEvent
from memetrace.settings import Settings
from memetrace.stream import DeadLetter, StreamWorker
from memetrace.vector_index import VectorIndex

log = logging.getLogger(__name__)

RECENT = 100_000  # image ids remembered as matched; a restart forgets them (matching again is harmless)


class MatchWorker(StreamWorker):
    """Verifies the copies of each new image and publishes them; see the module docstring."""

    name = "match"

    def __init__(self, settings: Settings, index: VectorIndex, features: FeatureStore, metrics: MatchMetrics,
                 producer: KafkaProducer | None = None, consumer: KafkaConsumer | None = None) -> None:
        s = settings
        super().__init__(s, metrics, [s.kafka_images_topic], s.kafka_match_group_id, s.match_batch_size, consumer,
                         producer)
        self.metrics: MatchMetrics = metrics
        self.matcher = Matcher(MatchConfig.from_settings(s), index, features)
        self.probes["milvus"] = index.count  # answers: a failing match of one event is that event's
        self.recent: OrderedDict[int, None] = OrderedDict()
        self.matched = 0
        self.published = 0

    def process(self, records: Sequence[ConsumerRecord]) -> list[DeadLetter]:
        events, dead = self.parse(ImageEvent, records)
        todo = [i for i in dict.fromkeys(e.image_id for _, e in events) if i not in self.recent]
        if not todo:
            return dead
        t0 = time.perf_counter()
        matches = self.retry("milvus", lambda: self.matcher.match_stored(todo))
        per_image = (time.perf_counter() - t0) / len(todo)
        edges = [MatchEvent.of(m) for m in matches]
        self.send([(self.s.kafka_matches_topic, e.key(), e.to_bytes(), []) for e in edges])
        for image_id in todo:
            self.metrics.match_seconds.observe(per_image)
            self.recent[image_id] = None
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        self.metrics.images_matched.inc(len(todo))
        self.matched += len(todo)
        for e in edges:
            self.metrics.matches.labels(e.kind).inc()
        self.published += len(edges)
        log.info("images matched", extra={"images": len(todo), "edges": len(edges),
                                          "seconds_per_image": round(per_image, 4)})
        return dead
