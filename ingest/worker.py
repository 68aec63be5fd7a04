"""The streaming ingest worker: ``memetrace ingest``.

One worker is one member of the Kafka consumer group ``kafka_group_id`` on the posts topic.
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

Offsets are committed only after every sink acknowledged (quixstreams' rule), so a crash at any
point redelivers the batch; every row is keyed by content or position, so redelivery rewrites the
same rows (at-least-once delivery, exactly-once rows). Events may be published twice: the matcher
must be idempotent. While Kafka or Milvus is down a write is retried with capped exponential
backoff and nothing is committed. SIGTERM/SIGINT: stop polling, finish the batch in hand (or
abandon it, uncommitted, if it is stuck retrying), commit what is durable, exit 0. A partition
revoked by a rebalance gets its durable-but-uncommitted offsets committed first.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from prometheus_client import CollectorRegistry
from pymilvus.exceptions import MilvusException

from ingest.fetch import Fetcher, FetchPolicy, FetchResult
from ingest.indexer import Indexer, Prepared
from ingest.messages import (FeaturePaths, ImageEvent, InvalidMessage, Post, deadletter_headers, deadletter_key,
                             occurrence_key, parse_post, source_of)
from ingest.producer import client_config, ensure_topics, make_producer
from ingest.sources import InputItem
from memetrace.context import Context
from memetrace.feature_store import FeatureStore
from memetrace.imageio import BadImage, content_id
from memetrace.metrics import IngestMetrics, serve
from memetrace.milvus_store import DeadLetterRow, OccurrenceRow
from memetrace.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# what a dependency being down looks like; anything else is a bug and stops the worker
TRANSIENT = (MilvusException, KafkaError, ConnectionError, TimeoutError, OSError)


class Abandoned(Exception):
    """The batch was given up (stop requested while a write kept failing); nothing was committed."""


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


class IngestWorker:
    """Consumes posts, stores images and occurrences, publishes events; see the module docstring."""

    def __init__(self, ctx: Context, metrics: IngestMetrics, consumer: KafkaConsumer | None = None) -> None:
        s = self.s = ctx.settings
        self.metrics = metrics
        self.store = ctx.store
        self.features: FeatureStore = ctx.features
        self.fetcher = Fetcher(FetchPolicy.from_settings(s))
        m = metrics
        self.indexer = _RecordingIndexer(
            s, _Timed(ctx.embedder, "embed", m.embed_batch_seconds.observe),
            _Timed(ctx.extractor, "extract", m.sift_seconds.observe),
            _Timed(self.store, "upsert", m.milvus_write_seconds.observe), self.features, ctx.catalog,
            decode_seconds=m.decode_seconds.observe)
        m.device.labels(str(ctx.embedder.device)).set(1)
        self.producer = make_producer(s)
        self.consumer = consumer or KafkaConsumer(
            **client_config(s), group_id=s.kafka_group_id, enable_auto_commit=False,
            auto_offset_reset=s.kafka_auto_offset_reset, max_poll_records=s.ingest_batch_size,
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(100, s.kafka_session_timeout_ms // 3),
            max_poll_interval_ms=s.kafka_max_poll_interval_ms)
        self.totals = Totals()
        self._stop = threading.Event()
        self._durable: dict[TopicPartition, OffsetAndMetadata] = {}  # stored, not yet committed

    # ------------------------------------------------------------------ lifecycle

    def stop(self, why: str = "stop") -> None:
        """Ask the loop to end after the batch in hand (safe from a signal handler)."""
        if not self._stop.is_set():
            self.totals.stopped_by = why
            self._stop.set()

    def run(self, max_idle: float | None = None) -> Totals:
        """Poll → store → commit until stopped, or until ``max_idle`` seconds pass without a message."""
        self.consumer.subscribe([self.s.kafka_posts_topic], listener=_Rebalance(self))
        log.info("ingest started", extra={"topic": self.s.kafka_posts_topic, "group": self.s.kafka_group_id,
                                          "max_idle": max_idle})
        last_message = time.monotonic()
        try:
            while not self._stop.is_set():
                idle = time.monotonic() - last_message
                if max_idle is not None and idle >= max_idle:
                    self.stop("max_idle")
                    break
                wait = 1.0 if max_idle is None else max(0.05, min(1.0, max_idle - idle))
                polled = self.consumer.poll(timeout_ms=int(wait * 1000), max_records=self.s.ingest_batch_size)
                records = sorted((r for rs in polled.values() for r in rs), key=lambda r: (r.partition, r.offset))
                if records:
                    self.process(records)
                    self.commit()
                    last_message = time.monotonic()  # idle = waiting, not working
                self._observe_lag()
        except Abandoned as exc:
            log.warning("batch abandoned, not committed: it will be redelivered", extra={"why": str(exc)})
        finally:
            self.commit()
            self.consumer.close(autocommit=False)
            self.producer.close(timeout=10)
        log.info("ingest stopped", extra=self.totals.as_dict())
        return self.totals

    # ------------------------------------------------------------------ one batch

    def process(self, records: Sequence[ConsumerRecord]) -> None:
        """Store one batch in every sink; its offsets become committable only when all acknowledged."""
        t0 = time.perf_counter()
        self.metrics.batch_size.observe(len(records))
        self.metrics.posts_consumed.inc(len(records))
        items = [self._parse(r) for r in records]
        downloads = self._download({it.post.url for it in items if it.dead is None and it.post})
        events = self._index(items, downloads)
        self._retry("milvus", lambda: self._write_records(items))
        self._retry("kafka", lambda: self._publish(items, events))
        for it in items:
            tp = TopicPartition(it.record.topic, it.record.partition)
            self._durable[tp] = OffsetAndMetadata(it.record.offset + 1, "", -1)
        self._count(items)
        self.totals.batches += 1
        self.metrics.batches.inc()
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        log.info("batch stored", extra={"records": len(records), "seconds": round(time.perf_counter() - t0, 3),
                                        "deadlettered": sum(it.dead is not None for it in items)})
        if (time.perf_counter() - t0) * 1000 > self.s.kafka_max_poll_interval_ms / 2:
            log.warning("batch took over half of max_poll_interval_ms: lower MEMETRACE_INGEST_BATCH_SIZE or raise "
                        "MEMETRACE_KAFKA_MAX_POLL_INTERVAL_MS", extra={"seconds": time.perf_counter() - t0})

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
        stored_before = self._retry("milvus", lambda: self.store.existing(sorted({content_id(d) for d in data.values()})))
        self.indexer.outcomes = {}
        self._retry("milvus", lambda: self.indexer.index([InputItem(url, lambda d=d: d) for url, d in data.items()]))
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
                events.append(_event(outcome, it.post, new, self.features))
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
                reason, detail = it.dead
                futures.append(self.producer.send(
                    s.kafka_deadletter_topic, key=it.record.key, value=it.record.value or b"",
                    headers=deadletter_headers(reason, detail, it.source, it.post.post_id if it.post else "")))
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

    # ------------------------------------------------------------------ offsets and retries

    def commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit the durable offsets (of ``partitions``, default all); a lost group means redelivery."""
        todo = {tp: om for tp, om in self._durable.items() if partitions is None or tp in partitions}
        if not todo:
            return
        try:
            self._retry("kafka", lambda: self.consumer.commit(offsets=todo), retry_if=_commit_retryable)
        except CommitFailedError as exc:
            log.warning("commit refused (partitions moved to another worker); they will be redelivered there",
                        extra={"partitions": [str(tp) for tp in todo], "error": str(exc)})
        except Abandoned:
            return
        for tp in todo:
            if self._durable.get(tp) is todo[tp]:
                del self._durable[tp]

    def _retry(self, target: str, fn: Callable[[], T],
               retry_if: Callable[[BaseException], bool] = lambda e: isinstance(e, TRANSIENT)) -> T:
        """``fn()`` until it succeeds, backing off up to ``ingest_retry_max_s``; :class:`Abandoned` on stop."""
        delay = 0.2
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - filtered just below
                if not retry_if(exc):
                    raise
                self.metrics.retries.labels(target).inc()
                log.warning("write failed, retrying", extra={"target": target, "error": f"{type(exc).__name__}: "
                                                             f"{exc}", "retry_in_s": delay})
                if target == "milvus" and _not_loaded(exc):
                    self._load_collections()
            if self._stop.wait(delay):
                raise Abandoned(f"stop requested while {target} was failing")
            delay = min(delay * 2, self.s.ingest_retry_max_s)

    def _load_collections(self) -> None:
        """A restarted Milvus (Lite) serves its collections 'released': load them again (idempotent)."""
        st = self.store
        try:
            for name in (st.images, st.regions, st.occurrences, st.deadletters):
                st.client.load_collection(name)
        except TRANSIENT as exc:  # still down: the next retry tries again
            log.warning("reloading Milvus collections failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _observe_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            position = self.consumer.position(tp, timeout_ms=1000)
            if position is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - position))


def _not_loaded(exc: BaseException) -> bool:
    """Milvus refused a collection that is not loaded (code 101: e.g. after a Milvus Lite restart)."""
    return isinstance(exc, MilvusException) and (getattr(exc, "code", None) == 101 or "call load()" in str(exc))


def _commit_retryable(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) and not isinstance(exc, CommitFailedError)


def _event(p: Prepared, post: Post, new: bool, features: FeatureStore) -> ImageEvent:
    image_id = p.image.image_id
    return ImageEvent(image_id=image_id, new_image=new, width=p.image.width, height=p.image.height,
                      nbytes=p.image.nbytes, nb_points=len(p.keypoints), post=post,
                      features=FeaturePaths(keypoints=features.keypoints_key(image_id),
                                            thumbnail=features.thumbnail_key(image_id)))


class _Rebalance(ConsumerRebalanceListener):
    """Commits durable offsets of partitions before they move; records assignments."""

    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info("partitions revoked", extra={"partitions": [f"{tp.topic}/{tp.partition}" for tp in revoked]})
        self.worker.commit(list(revoked))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        names = [f"{tp.topic}/{tp.partition}" for tp in assigned]
        self.worker.totals.partitions.update(names)
        log.info("partitions assigned", extra={"partitions": names})


def run_worker(settings: Settings, max_idle: float | None = None,
               registry: CollectorRegistry | None = None) -> tuple[IngestWorker, Totals]:
    """Build a worker from settings and run it (the body of ``memetrace ingest``)."""
    s = settings
    ensure_topics(s, [s.kafka_posts_topic, s.kafka_images_topic, s.kafka_deadletter_topic])
    registry = registry or CollectorRegistry()
    server = serve(registry, s.metrics_port, s.metrics_host)
    worker = IngestWorker(Context(s), IngestMetrics(registry))
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: worker.stop(signal.Signals(signum).name))
    try:
        return worker, worker.run(max_idle)
    finally:
        if server is not None:
            server.shutdown()
