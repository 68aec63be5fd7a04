"""The streaming ingest worker: ``memetrace ingest``.

One worker is one member of the Kafka consumer group ``kafka_ingest_group_id`` on the posts topic.
Its life::

    start ── ensure topics, load the embedder, open Milvus, serve /metrics
      │
      ▼
    poll (≤ ingest_batch_size records) ◄────────────────────────────────────────────┐
      │  nothing for --max-idle seconds ──► exit 0                                  │
      ▼                                                                             │
    parse each value as a Post ──────────── invalid ──┐                             │
      ▼                                               │                             │
    download every distinct URL in parallel ─ failed ─┤                             │
      ▼                                               │                             │
    Indexer: decode → content hash → SIFT → embed ─ bad image ─┤                    │
             → feature store → Milvus images/regions           │                    │
      ▼                                               ▼                             │
    Milvus occurrences (pk = hash(post_id))   Milvus dead letters (pk = hash(topic/partition/offset))
      ▼                                               ▼                             │
    publish memetrace.images events           publish original bytes on memetrace.deadletter
      └──────────── producer.flush() ─────────────────┘                             │
      ▼                                                                             │
    commit last offset + 1 per partition ───────────────────────────────────────────┘

The poll/commit loop, retries and shutdown are :class:`memetrace.stream.StreamWorker`'s:
offsets are committed only after every sink acknowledged, and every row is keyed by content or
position, so a redelivered batch rewrites the same rows (at-least-once delivery, exactly-once
rows). Events may be published twice: the matcher must be idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import CollectorRegistry

from memetrace.ingest.fetch import Fetcher, FetchPolicy, FetchResult
from memetrace.ingest.indexer import Indexer, Prepared
from memetrace.messages import (
    ImageEvent,
    InvalidMessage,
    Post,
    PostRef,
    dead_letter,
    deadletter_key,
    occurrence_key,
    parse_post,
    source_of,
)
from memetrace.ingest.sources import InputItem
from memetrace.components import Components
from memetrace.feature_store import FeatureStore
from memetrace.imageio import BadImage, content_id
from memetrace.kafka_clients import ensure_topics, make_producer
from memetrace.ingest.metrics import IngestMetrics
from memetrace.models import DeadLetterRow, OccurrenceRow
from memetrace.settings import Settings
from memetrace.stream import StreamWorker, run_service

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one batch


@dataclass
class Item:
    """One consumed message and what became of it: ``post`` stored, or ``dead`` with a reason."""

    record: ConsumerRecord
    post: Post | None = None
    dead: tuple[str, str] | None = None  # (reason, detail)
    image_id: int | None = None
    new_image: bool = False  # its image was not in Milvus before this batch (first post of it)

    @property
    def source(self) -> str:
        return source_of(self.record.topic, self.record.partition, self.record.offset)


@dataclass
class Totals:
    """What a worker did in its life; printed as JSON by ``memetrace ingest`` when it exits."""

    posts: int = 0
    occurrences: int = 0
    new_images: int = 0
    duplicates: int = 0
    deadlettered: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    partitions: set[str] = field(default_factory=set)
    stopped_by: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"posts": self.posts, "occurrences": self.occurrences, "new_images": self.new_images,
                "duplicates": self.duplicates, "deadlettered": dict(sorted(self.deadlettered.items())),
                "batches": self.batches, "partitions": sorted(self.partitions), "stopped_by": self.stopped_by}


class _Timed:
    """Forwards ``inner``; calls of ``method`` are timed into ``observe`` (seconds, kept per thread)."""

    def __init__(self, inner: Any, method: str, observe: Callable[[float], None]) -> None:
        self._inner, self._method, self._observe = inner, method, observe
        self.last = threading.local()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.last.seconds = time.perf_counter() - t0
                self._observe(self.last.seconds)

        return timed


class _RecordingIndexer(Indexer):
    """The batch :class:`Indexer`, remembering what each input decoded to (its key: the URL)."""

    def __init__(self, *args: Any, decode_seconds: Callable[[float], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, Prepared | BadImage] = {}
        self._decode_seconds = decode_seconds

    def prepare(self, item: InputItem) -> Prepared | BadImage:
        t0 = time.perf_counter()
        self.extractor.last.seconds = 0.0
        result = super().prepare(item)
        self._decode_seconds(time.perf_counter() - t0 - self.extractor.last.seconds)
        self.outcomes[item.key] = result
        return result


class IngestWorker(StreamWorker):
    """Consumes posts, stores images and occurrences, publishes events; see the module docstring."""

    name = "ingest"

    def __init__(self, ctx: Components, metrics: IngestMetrics, consumer: KafkaConsumer | None = None) -> None:
        s = ctx.settings
        super().__init__(s, metrics, [s.kafka_posts_topic], s.kafka_ingest_group_id, s.ingest_batch_size, consumer,
                         store=ctx.store)
        self.metrics: IngestMetrics = metrics
        self.features: FeatureStore = ctx.features
        self.fetcher = Fetcher(FetchPolicy.from_settings(s))
        m = metrics
        self.indexer = _RecordingIndexer(
            s, _Timed(ctx.embedder, "embed", m.embed_batch_seconds.observe),
            _Timed(ctx.extractor, "extract", m.sift_seconds.observe),
            _Timed(ctx.store, "upsert", m.milvus_write_seconds.observe), self.features, None,
            decode_seconds=m.decode_seconds.observe)
        m.device.labels(str(ctx.embedder.device)).set(1)
        self.producer = make_producer(s)
        self.totals = Totals()

    def close(self) -> None:
        self.producer.close(timeout=10)
        self.totals.stopped_by = self.stopped_by
        self.totals.partitions = set(self.partitions)
        log.info("ingest totals", extra=self.totals.as_dict())

    def process(self, records: Sequence[ConsumerRecord]) -> None:
        """Store one batch in every sink; its offsets become committable only when all acknowledged."""
        self.metrics.posts_consumed.inc(len(records))
        items = [self._parse(r) for r in records]
        downloads = self._download({it.post.url for it in items if it.dead is None and it.post})
        events = self._index(items, downloads)
        self.retry("milvus", lambda: self._write_records(items))
        self.retry("kafka", lambda: self._publish(items, events))
        self._count(items)
        self.totals.batches += 1

    def _parse(self, record: ConsumerRecord) -> Item:
        try:
            return Item(record, post=parse_post(record.value))
        except InvalidMessage as exc:
            return Item(record, dead=(exc.reason, exc.detail))

    def _download(self, urls: set[str]) -> dict[str, FetchResult]:
        results = {r.url: r for r in self.fetcher.fetch_many(sorted(urls))}
        for r in results.values():
            self.metrics.download_seconds.observe(r.seconds)
            if r.ok and r.data is not None:
                self.metrics.downloaded_bytes.inc(len(r.data))
            else:
                self.metrics.download_failures.labels(r.reason or "error").inc()
                log.info("download failed", extra={"url": r.url, "reason": r.reason, "detail": r.detail})
        return results

    def _index(self, items: list[Item], downloads: dict[str, FetchResult]) -> list[ImageEvent]:
        """Decode, embed and store the downloaded images; mark each item stored or dead."""
        data = {url: r.data for url, r in downloads.items() if r.ok and r.data is not None}
        stored_before = self.retry("milvus", lambda: self.store.existing(sorted({content_id(d) for d in data.values()})))
        self.indexer.outcomes = {}
        self.retry("milvus", lambda: self.indexer.index([InputItem(url, lambda d=d: d) for url, d in data.items()]))
        events: list[ImageEvent] = []
        announced: set[int] = set()
        for it in items:
            if it.dead is not None or it.post is None:
                continue
            fetched = downloads[it.post.url]
            outcome = self.indexer.outcomes.get(it.post.url)
            if not fetched.ok:
                it.dead = (f"download_{fetched.reason}", fetched.detail)
            elif isinstance(outcome, BadImage):
                it.dead = (f"image_{outcome.reason}", outcome.detail)
            elif isinstance(outcome, Prepared):
                image_id = outcome.image.image_id
                new = image_id not in stored_before and image_id not in announced
                announced.add(image_id)
                it.image_id, it.new_image = image_id, new
                events.append(_event(outcome, it.post))
            else:
                it.dead = ("error", f"no outcome for {it.post.url}: a bug, please report")
        return events

    def _write_records(self, items: list[Item]) -> None:
        """Occurrences and dead letters, both upserts keyed by the message: safe to repeat."""
        occurrences = [OccurrenceRow(occurrence_key(it.post.post_id), it.image_id, it.post.post_id, it.post.url,
                                     it.post.posted_at_unix(), it.post.platform, it.post.author)
                       for it in items if it.image_id is not None and it.post is not None]
        dead = [DeadLetterRow(deadletter_key(it.source), it.dead[0], it.dead[1],
                              it.post.post_id if it.post else "", it.post.url if it.post else "", it.source)
                for it in items if it.dead is not None]
        self.store.upsert_occurrences(occurrences)
        self.store.upsert_deadletters(dead)

    def _publish(self, items: list[Item], events: list[ImageEvent]) -> None:
        s = self.s
        futures = [self.producer.send(s.kafka_images_topic, key=str(e.image_id).encode(), value=e.to_bytes())
                   for e in events]
        for it in items:
            if it.dead is not None:
                value, headers = dead_letter(it.record.value, *it.dead, it.source, it.post.post_id if it.post else "")
                futures.append(self.producer.send(s.kafka_deadletter_topic, key=it.record.key, value=value,
                                                  headers=headers))
        self.producer.flush()
        for fut in futures:
            fut.get(timeout=30)

    def _count(self, items: list[Item]) -> None:
        t, m = self.totals, self.metrics
        t.posts += len(items)
        for it in items:
            if it.dead is not None:
                reason = it.dead[0]
                t.deadlettered[reason] = t.deadlettered.get(reason, 0) + 1
                m.deadlettered.labels(reason).inc()
                log.info("dead-lettered", extra={"source": it.source, "reason": reason, "detail": it.dead[1]})
        stored = [it for it in items if it.image_id is not None]
        new = sum(it.new_image for it in stored)
        t.occurrences += len(stored)
        t.new_images += new
        t.duplicates += len(stored) - new
        m.occurrences.inc(len(stored))
        m.images_stored.inc(new)
        m.duplicates.inc(len(stored) - new)


def _event(p: Prepared, post: Post) -> ImageEvent:
    return ImageEvent(image_id=p.image.image_id, nb_points=len(p.keypoints),
                      post=PostRef(post_id=post.post_id, posted_at=post.posted_at_unix(), platform=post.platform))
