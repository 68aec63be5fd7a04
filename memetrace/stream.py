"""The at-least-once Kafka loop every streaming service runs (ingest, match, cluster).

A service is a :class:`StreamWorker` with its own :meth:`~StreamWorker.process`::

    subscribe(topics, group) ──► poll ≤ batch records ──► process(records) ──► commit ──┐
          ▲                        │ nothing for max_idle s: exit         (sinks flushed) │
          │                        ▼                                                     │
          │                     tick()  (periodic work, e.g. reclustering)               │
          └──────────────────────────────────────────────────────────────────────────────┘

``process`` returns only once every sink (Milvus, Kafka producer, SQLite) acknowledged; only
then are the batch's offsets committable (quixstreams' checkpoint rule), so a crash redelivers
the batch and sinks must be idempotent. Writes to a dependency that is down go through
:meth:`~StreamWorker.retry`: capped exponential backoff, nothing committed meanwhile.
SIGTERM/SIGINT: stop polling, finish (or abandon, uncommitted) the batch in hand, commit what
is durable, exit. A partition revoked by a rebalance gets its durable offsets committed first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from pymilvus.exceptions import MilvusException

from memetrace.kafka_clients import client_config
from memetrace.metrics import StreamMetrics, serve
from memetrace.milvus_store import MilvusStore
from memetrace.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# what a dependency being down looks like; anything else is a bug and stops the worker
TRANSIENT = (MilvusException, KafkaError, ConnectionError, TimeoutError, OSError)


class Abandoned(Exception):
    """The batch was given up (stop requested while a write kept failing); nothing was committed."""


class StreamWorker(ABC):
    """One consumer-group member; subclasses say what a batch means in :meth:`process`."""

    name = "stream"

    def __init__(self, settings: Settings, metrics: StreamMetrics, topics: Sequence[str], group_id: str,
                 batch_size: int, consumer: KafkaConsumer | None = None, store: MilvusStore | None = None) -> None:
        s = self.s = settings
        self.metrics = metrics
        self.topics = list(topics)
        self.group_id = group_id
        self.batch_size = batch_size
        self.store = store  # reloaded after a Milvus restart, when given
        self.consumer = consumer or KafkaConsumer(
            **client_config(s), group_id=group_id, enable_auto_commit=False,
            auto_offset_reset=s.kafka_auto_offset_reset, max_poll_records=batch_size,
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(100, s.kafka_session_timeout_ms // 3),
            max_poll_interval_ms=s.kafka_max_poll_interval_ms)
        self.stopped_by = ""
        self.partitions: set[str] = set()  # every partition this worker was assigned
        self.joined_at: float | None = None  # monotonic time of the first assignment (maybe empty)
        self.running = threading.Event()  # set while polling: what /readyz reports
        self._stop = threading.Event()
        self._durable: dict[TopicPartition, OffsetAndMetadata] = {}  # stored, not yet committed

    # ------------------------------------------------------------------ what a service defines

    @abstractmethod
    def process(self, records: Sequence[ConsumerRecord]) -> None:
        """Write one batch to every sink; return only when all acknowledged."""

    def tick(self) -> None:
        """Called after every poll, records or not (periodic work)."""

    def close(self) -> None:
        """Release the service's own clients (producers...)."""

    # ------------------------------------------------------------------ lifecycle

    def stop(self, why: str = "stop") -> None:
        """Ask the loop to end after the batch in hand (safe from a signal handler)."""
        if not self._stop.is_set():
            self.stopped_by = why
            self._stop.set()

    def run(self, max_idle: float | None = None) -> None:
        """Poll → process → commit until stopped, or until ``max_idle`` seconds pass without a message.

        The idle clock starts when the group first assigns partitions: joining a group can take
        longer than ``max_idle`` (about 5 s on Tansu), and a worker must not quit before it could read.
        """
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))
        log.info(f"{self.name} started", extra={"topics": self.topics, "group": self.group_id, "max_idle": max_idle})
        self.running.set()
        last_message = 0.0
        try:
            while not self._stop.is_set():
                idle = 0.0 if self.joined_at is None else time.monotonic() - max(self.joined_at, last_message)
                if max_idle is not None and idle >= max_idle:
                    self.stop("max_idle")
                    break
                wait = 1.0 if max_idle is None else max(0.05, min(1.0, max_idle - idle))
                polled = self.consumer.poll(timeout_ms=int(wait * 1000), max_records=self.batch_size)
                records = sorted((r for rs in polled.values() for r in rs), key=lambda r: (r.partition, r.offset))
                if records:
                    t0 = time.perf_counter()
                    self.process(records)
                    self._mark_durable(records)
                    self.commit()
                    self._observe_batch(len(records), time.perf_counter() - t0)
                    last_message = time.monotonic()  # idle = waiting, not working
                self.tick()
                self._observe_lag()
        except Abandoned as exc:
            log.warning("stopped while a write kept failing: what was not committed will be redelivered",
                        extra={"why": str(exc)})
        finally:
            self.running.clear()
            self.commit()
            self.consumer.close(autocommit=False)
            self.close()
        log.info(f"{self.name} stopped", extra={"stopped_by": self.stopped_by})

    def _mark_durable(self, records: Sequence[ConsumerRecord]) -> None:
        for r in records:
            self._durable[TopicPartition(r.topic, r.partition)] = OffsetAndMetadata(r.offset + 1, "", -1)

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)
        log.info("batch stored", extra={"service": self.name, "records": size, "seconds": round(seconds, 3)})
        if seconds * 1000 > self.s.kafka_max_poll_interval_ms / 2:
            log.warning("batch took over half of max_poll_interval_ms: lower the batch size or raise "
                        "MEMETRACE_KAFKA_MAX_POLL_INTERVAL_MS", extra={"service": self.name, "seconds": seconds})

    # ------------------------------------------------------------------ offsets and retries

    def commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit the durable offsets (of ``partitions``, default all); a lost group means redelivery."""
        todo = {tp: om for tp, om in self._durable.items() if partitions is None or tp in partitions}
        if not todo:
            return
        try:
            self.retry("kafka", lambda: self.consumer.commit(offsets=todo), retry_if=_commit_retryable)
        except CommitFailedError as exc:
            log.warning("commit refused (partitions moved to another worker); they will be redelivered there",
                        extra={"partitions": [str(tp) for tp in todo], "error": str(exc)})
        except Abandoned:
            return
        for tp in todo:
            if self._durable.get(tp) is todo[tp]:
                del self._durable[tp]

    def retry(self, target: str, fn: Callable[[], T],
              retry_if: Callable[[BaseException], bool] = lambda e: isinstance(e, TRANSIENT)) -> T:
        """``fn()`` until it succeeds, backing off up to ``retry_max_s``; :class:`Abandoned` on stop."""
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
            delay = min(delay * 2, self.s.retry_max_s)

    def _load_collections(self) -> None:
        """A restarted Milvus (Lite) serves its collections 'released': load them again (idempotent)."""
        st = self.store
        if st is None:
            return
        try:
            for name in (st.images, st.regions, st.occurrences, st.deadletters, st.clusters, st.cluster_summaries):
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


class _Rebalance(ConsumerRebalanceListener):
    """Commits durable offsets of partitions before they move; records assignments."""

    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info("partitions revoked", extra={"partitions": [f"{tp.topic}/{tp.partition}" for tp in revoked]})
        self.worker.commit(list(revoked))
        for tp in revoked:  # its new owner reports its lag now: a stale series would count it twice
            with contextlib.suppress(KeyError):
                self.worker.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        if self.worker.joined_at is None:
            self.worker.joined_at = time.monotonic()
        names = [f"{tp.topic}/{tp.partition}" for tp in assigned]
        self.worker.partitions.update(names)
        log.info("partitions assigned", extra={"partitions": names})


def _stop_from_signal(worker: StreamWorker, signum: int) -> None:
    # Event.set() takes the lock Event.wait() may hold in this very (main) thread: set it from another
    threading.Thread(target=worker.stop, args=(signal.Signals(signum).name,), daemon=True).start()


def run_service(worker: StreamWorker, max_idle: float | None = None) -> None:
    """Serve /metrics, /healthz, /readyz (ready while polling), stop on SIGTERM/SIGINT, run ``worker``."""
    s = worker.s
    server = serve(worker.metrics.registry, s.metrics_port, s.metrics_host, ready=worker.running.is_set)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: _stop_from_signal(worker, signum))
    try:
        worker.run(max_idle)
    finally:
        if server is not None:
            server.shutdown()
