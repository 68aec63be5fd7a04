"""The streaming ingest worker: ``memetrace ingest``.

One worker is one member of the Kafka consumer group ``kafka_ingest_group_id`` on the posts topic.
Its life::

    start ── ensure topics, load the embedder, open the stores, serve /metrics
      │
      ▼
    poll (≤ ingest_batch_size records) ◄────────────────────────────────────────────┐
      │  nothing for --max-idle seconds ──► exit 0                                  │
      ▼                                                                             │
    parse each value as a Post ──────────── invalid ──┐                             │
      ▼                                               │                             │
    download each distinct URL as the indexer ─ failed┤                             │
    reaches it (a window ahead), then                 │                             │
    Indexer: decode → SIFT → embed (once) ── refused ─┤                             │
             → feature store → vector index (retried) │                             │
      ▼                                               ▼                             │
    occurrence log (pk = hash(post_id))       dead letters (the loop: occurrence log, │
      ▼                                        pk = hash(topic/partition/offset), and │
    publish memetrace.images events            the message (a bounded prefix if large) on memetrace.deadletter)
      └──────────── acknowledged ─────────────────────┘                             │
      ▼                                                                             │
    commit last offset + 1 per partition ───────────────────────────────────────────┘

The poll/commit loop, dead letters, retries and shutdown are :class:`memetrace.stream.StreamWorker`'s:
offsets are committed only after every sink acknowledged, and every row is keyed by content or
position, so a redelivered batch rewrites the same rows (at-least-once delivery, exactly-once
rows). Each store call is retried on its own while its dependency is down: a batch is downloaded,
decoded and embedded once however long an outage lasts. Events may be published twice: the
matcher must be idempotent.

Memory: a batch's downloads start in order, at most ``fetch_max_in_flight`` ahead of the indexer's
reading them, and each body is dropped once its image is prepared, so the bodies held are at most
``(fetch_max_in_flight + 2 x prepare_threads) x max_file_bytes`` whatever ``ingest_batch_size``
(lower ``MEMETRACE_FETCH_MAX_IN_FLIGHT`` to hold less); decoding is bounded by the decode budget.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from memetrace.decode_budget import DecodeBudget
from memetrace.embedder import Embedder
from memetrace.feature_store import FeatureStore
from memetrace.fetch import Fetcher, FetchPolicy, FetchResult
from memetrace.ingest.indexer import Indexer, IndexConfig, IndexObserver, Outcome, Stored, Unindexable
from memetrace.ingest.metrics import IngestMetrics
from memetrace.ingest.sources import InputItem
from memetrace.keypoints import KeypointExtractor
from memetrace.messages import ImageEvent, Post, PostRef, deadletter_key, occurrence_key
from memetrace.models import DeadLetterRow, OccurrenceRow
from memetrace.occurrence_log import OccurrenceLog
from memetrace.settings import Settings
from memetrace.stream import DeadLetter, StreamConfig, StreamWorker, ping_probe
from memetrace.vector_index import VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostDeadLetter(DeadLetter):
    """A valid post whose image could not be stored: its URL goes into the dead-letter row too."""

    url: str = ""


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


def index_config(s: Settings) -> IndexConfig:
    """The batch pipeline's, in chunks of a quarter of a poll: one poll is indexed at a time, and
    only with several chunks in it is the next chunk decoded while one is embedded."""
    return replace(IndexConfig.from_settings(s), chunk_size=max(1, min(s.batch_size, -(-s.ingest_batch_size // 4))))


def observer_of(m: IngestMetrics) -> IndexObserver:
    """The indexer's step timings, into the ingest metrics."""
    return IndexObserver(decode_seconds=m.decode_seconds.observe, sift_seconds=m.sift_seconds.observe,
                         embed_seconds=m.embed_batch_seconds.observe, write_seconds=m.milvus_write_seconds.observe)


class IngestWorker(StreamWorker):
    """Consumes posts, stores images and occurrences, publishes events; see the module docstring."""

    name = "ingest"

    def __init__(self, settings: Settings, metrics: IngestMetrics, *, embedder: Embedder,
                 extractor: KeypointExtractor, index: VectorIndex, occurrences: OccurrenceLog,
                 features: FeatureStore, consumer: KafkaConsumer | None = None,
                 producer: KafkaProducer | None = None) -> None:
        s = settings
        super().__init__(StreamConfig.from_settings(s), metrics, [s.kafka_posts_topic], s.kafka_ingest_group_id,
                         s.ingest_batch_size, consumer, producer, probes={"milvus": ping_probe(index)})
        self.s = s
        self.metrics: IngestMetrics = metrics
        self.occurrences = occurrences
        self.fetcher = Fetcher(FetchPolicy.from_settings(s))
        self.indexer = Indexer(index_config(s), embedder, extractor, index, features,
                               observer_of(metrics), DecodeBudget.from_settings(s))
        metrics.device.labels(str(embedder.device)).set(1)
        self.totals = Totals()

    def close(self) -> None:
        self.totals.stopped_by = self.stopped_by
        self.totals.partitions = set(self.partitions)
        log.info("ingest totals", extra=self.totals.as_dict())

    def process(self, records: Sequence[ConsumerRecord]) -> list[DeadLetter]:
        """Store one batch in every sink; returns the dead letter of each post not stored."""
        posts, dead = self.parse(Post, records)
        downloads, outcomes = self._index(sorted({post.url for _, post in posts}))
        stored: list[tuple[Post, Stored]] = []
        for record, post in posts:
            fetched = downloads[post.url]
            outcome = outcomes[post.url] if fetched.ok else None
            if outcome is None:
                dead.append(PostDeadLetter(record, f"download_{fetched.reason}", fetched.detail, post.post_id, post.url))
            elif isinstance(outcome, Unindexable):
                dead.append(PostDeadLetter(record, f"image_{outcome.reason}", outcome.detail, post.post_id, post.url))
            else:
                stored.append((post, outcome))
        if stored:  # a write with nothing to write must not pass for one that reached Milvus (the poison rule)
            self.retry("occurrences", lambda: self.occurrences.add_occurrences([
                OccurrenceRow(occurrence_key(p.post_id), o.image_id, p.post_id, p.url, p.posted_at_unix(),
                              p.platform, p.author, meta=p.meta) for p, o in stored]))
        self.send([(self.s.kafka_images_topic, str(o.image_id).encode(), _event(o, p).to_bytes(), [])
                   for p, o in stored])
        self._count(len(records), stored)
        return dead

    def store_dead_letters(self, dead: Sequence[DeadLetter]) -> None:
        """Dead letters in the occurrence log (``memetrace stats`` counts them by reason)."""
        self.occurrences.add_dead_letters([
            DeadLetterRow(deadletter_key(d.source), d.reason, d.detail, d.post_id,
                          d.url if isinstance(d, PostDeadLetter) else "", d.source) for d in dead])
        for d in dead:  # counted once stored: a retried write must not count twice
            self.totals.deadlettered[d.reason] = self.totals.deadlettered.get(d.reason, 0) + 1

    def _observe_download(self, r: FetchResult) -> None:
        self.metrics.download_seconds.observe(r.seconds)
        if r.ok and r.data is not None:
            self.metrics.downloaded_bytes.inc(len(r.data))
        else:
            self.metrics.download_failures.labels(r.reason or "error").inc()
            log.info("download failed", extra={"url": r.url, "reason": r.reason, "detail": r.detail})

    def _index(self, urls: Sequence[str]) -> tuple[dict[str, FetchResult], dict[str, Outcome]]:
        """Each URL's download (without its body) and, if it succeeded, its outcome; only the store
        calls are retried, never the downloading or the computing."""
        with _Downloads(self.fetcher, urls, self._observe_download) as downloads:
            items = [InputItem(url, lambda url=url: downloads.take(url)) for url in urls]
            chunks = self.indexer.index(items, call=lambda fn: self.retry("images", fn))
            outcomes = {o.key: o for chunk in chunks for o in chunk}
        return downloads.results, outcomes

    def _count(self, consumed: int, stored: list[tuple[Post, Stored]]) -> None:
        t, m = self.totals, self.metrics
        # a post is the first of its image when the indexer stored the image anew and no earlier
        # post of this batch showed it (posts of one URL share its outcome)
        announced: set[int] = set()
        new = 0
        for _, o in stored:
            new += o.new and o.image_id not in announced
            announced.add(o.image_id)
        t.posts += consumed
        t.batches += 1
        t.occurrences += len(stored)
        t.new_images += new
        t.duplicates += len(stored) - new
        m.posts_consumed.inc(consumed)
        m.occurrences.inc(len(stored))
        m.images_stored.inc(new)
        m.duplicates.inc(len(stored) - new)


class _DownloadFailed(ValueError):
    """A body that could not be had (the indexer records the input as unreadable; the worker
    dead-letters its posts with the download's reason)."""


class _Downloads:
    """The downloads of one batch, started in order and at most ``window`` (the fetcher's
    ``max_in_flight``) ahead of the last one taken; :meth:`take` hands a body over for good."""

    def __init__(self, fetcher: Fetcher, urls: Sequence[str], observe: Callable[[FetchResult], None]) -> None:
        self.fetcher = fetcher
        self.urls = list(urls)
        self.window = fetcher.policy.max_in_flight
        self.observe = observe
        self.results: dict[str, FetchResult] = {}  # taken, without their bodies
        self._at = {url: i for i, url in enumerate(self.urls)}
        self._futures: dict[int, Future[FetchResult]] = {}
        self._started = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, min(self.window, len(self.urls))), thread_name_prefix="fetch")
        self._start(self.window)

    def __enter__(self) -> _Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # a failed batch: nothing left downloading

    def _start(self, until: int) -> None:
        with self._lock:
            while self._started < min(until, len(self.urls)):
                self._futures[self._started] = self._pool.submit(self.fetcher.fetch, self.urls[self._started])
                self._started += 1

    def take(self, url: str) -> bytes:
        """``url``'s body, now ours alone (its download started at the latest now); raises
        :class:`_DownloadFailed` if it failed."""
        i = self._at[url]
        self._start(i + 1 + self.window)  # keep the window full ahead of the reader
        with self._lock:
            future = self._futures.pop(i)
        result = future.result()
        self.observe(result)
        self.results[url] = replace(result, data=None)
        if not result.ok or result.data is None:
            raise _DownloadFailed(f"download failed: {result.reason}")
        return result.data


def _event(o: Stored, post: Post) -> ImageEvent:
    return ImageEvent(image_id=o.image_id, nb_points=o.nb_points,
                      post=PostRef(post_id=post.post_id, posted_at=post.posted_at_unix(), platform=post.platform))
