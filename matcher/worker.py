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

from memetrace.matcher.matching import Matcher
from memetrace.matcher.metrics import MatchMetrics
from memetrace.messages import ImageEvent, MatchEvent
from memetrace.settings import Settings
from memetrace.stream import DeadLetter, StreamConfig, StreamWorker, ping_probe

log = logging.getLogger(__name__)

RECENT = 100_000  # image ids remembered as matched; a restart forgets them (matching again is harmless)


class MatchWorker(StreamWorker):
    """Verifies the copies of each new image and publishes them; see the module docstring."""

    name = "match"

    def __init__(self, settings: Settings, matcher: Matcher, metrics: MatchMetrics,
                 producer: KafkaProducer | None = None, consumer: KafkaConsumer | None = None) -> None:
        """``matcher``: built by the caller (``Matcher(MatchConfig.from_settings(s), index, features)``)."""
        s = settings
        super().__init__(StreamConfig.from_settings(s), metrics, [s.kafka_images_topic], s.kafka_match_group_id,
                         s.match_batch_size, consumer, producer, probes={"milvus": ping_probe(matcher.index)})
        self.s = s
        self.metrics: MatchMetrics = metrics
        self.matcher = matcher
        self.recent: OrderedDict[int, None] = OrderedDict()
        self.matched = 0
        self.published = 0

    def process(self, records: Sequence[ConsumerRecord]) -> list[DeadLetter]:
        events, dead = self.parse(ImageEvent, records)
        todo = [i for i in dict.fromkeys(e.image_id for _, e in events) if i not in self.recent]
        if not todo:
            return dead
        t0 = time.perf_counter()
        # each store read retried alone, named by its dependency: no search or verification done twice
        matches = self.matcher.match_stored(todo, call=lambda fn: self.retry("match reads", fn))
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
