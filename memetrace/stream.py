"""The at-least-once Kafka loop every streaming service runs (ingest, match, cluster).

A service is a :class:`StreamWorker` with its own :meth:`~StreamWorker.process`::

    subscribe(topics, group) ──► poll ≤ batch records ──► process(records) ──► dead letters ──► commit ──┐
          ▲                        │ nothing for max_idle s: exit    (sinks flushed)   (acked)              │
          │                        ▼                                                                      │
          │                     tick()  (periodic work, e.g. reclustering)                                │
          └───────────────────────────────────────────────────────────────────────────────────────────────┘

**One rule: every consumed message is processed or dead-lettered with a reason.** ``process``
returns the :class:`DeadLetter` of each record it refuses (parse with :meth:`StreamWorker.parse`:
whatever is wrong with a value becomes one); every other record counts as processed. The loop
publishes the dead letters on ``kafka_deadletter_topic`` (headers by
:func:`memetrace.messages.dead_letter`: reason, source, size and hash; a bounded prefix of a large
value), then commits. Offsets are committable only once every sink, the dead-letter producer
included, acknowledged (quixstreams' checkpoint rule): a crash redelivers, so sinks must be idempotent.

Failures, decided by :meth:`StreamWorker.retry` (use it around each write, so a retry does not
compute again; the loop also wraps ``process`` in it):

- :class:`~memetrace.errors.DependencyDown` (and Kafka's retriable errors): capped exponential
  backoff up to ``retry_max_s``, nothing committed, ``/readyz`` red with the reason meanwhile.
- The same write failing ``poison_after_retries`` times in a row, each time while its dependency
  answers a probe (``probes[dependency]``, e.g. :func:`ping_probe`; none registered = assume an
  outage, keep waiting; a failed probe starts the count again), makes the batch *suspect*; so does
  :class:`~memetrace.errors.Refused` (e.g. a record over the producer's ``max_request_size``). The
  loop then processes the batch record by record. A refused record is dead-lettered at once as
  ``poison_<dependency>`` (counted in ``memetrace_poison_messages_total``). Any other failing record
  is poison only when another record of the batch *passed that very write* (the same ``retry``
  target) before it was tried: then the dependency works and the message is at fault. Otherwise (a one-record batch,
  the others invalid or skipping that write, all failing alike) it is the dependency: the loop
  waits ``retry_max_s``, readiness red, and tries the undecided records again. So a ``process``
  must not call ``retry`` for a write with nothing to write.
- A full disk (``ENOSPC``, ``EDQUOT``) waits as dependency ``disk`` (space can be freed: the
  worker resumes by itself), logged as an error naming the path. A permission error (``EACCES``,
  ``EPERM``, ``EROFS``) cannot pass by waiting: it is logged with the path and the fix, and the
  worker stops (:class:`~memetrace.errors.StorageDenied`, nothing of the batch committed).
- A :class:`~memetrace.messages.InvalidMessage` escaping ``process`` is dead-lettered like a
  poison message (record by record). Anything else is a bug and stops the worker.

SIGTERM/SIGINT: stop polling, finish (or abandon, uncommitted) the batch in hand, commit what
is durable, exit. A partition revoked by a rebalance gets its durable offsets committed first.

Test-only fault injection: ``MEMETRACE_FAULT_KILL_BEFORE_COMMIT=N`` SIGKILLs the process right
before the N-th batch commit (outputs and dead letters flushed, offsets not committed).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError

from memetrace.errors import DependencyDown, Refused, StorageDenied
from memetrace.kafka_clients import Message, client_config, durable_producer, kafka_error, publish
from memetrace.messages import InvalidMessage, dead_letter, parse, source_of
from memetrace.metrics import StreamMetrics, serve
from memetrace.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M")

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class StreamConfig:
    """What the consume loop reads from the settings (``MEMETRACE_`` + the upper-cased setting names
    of :meth:`from_settings`)."""

    kafka: Mapping[str, Any] = field(compare=False)  # client_config(): the brokers
    deadletter_topic: str
    auto_offset_reset: str
    session_timeout_ms: int
    max_poll_interval_ms: int
    retry_max_s: float  # cap of the backoff while a dependency is down
    poison_after_retries: int
    fault_kill_before_commit: int  # test-only: SIGKILL before the N-th commit (0 = off)
    metrics_port: int  # /metrics, /healthz, /readyz; 0 = off
    metrics_host: str

    def __post_init__(self) -> None:
        if self.retry_max_s <= 0 or self.poison_after_retries < 1:
            raise ValueError("retry_max_s must be > 0 and poison_after_retries >= 1")

    @classmethod
    def from_settings(cls, s: Settings) -> StreamConfig:
        return cls(kafka=client_config(s), deadletter_topic=s.kafka_deadletter_topic,
                   auto_offset_reset=s.kafka_auto_offset_reset, session_timeout_ms=s.kafka_session_timeout_ms,
                   max_poll_interval_ms=s.kafka_max_poll_interval_ms, retry_max_s=s.retry_max_s,
                   poison_after_retries=s.poison_after_retries, fault_kill_before_commit=s.fault_kill_before_commit,
                   metrics_port=s.metrics_port, metrics_host=s.metrics_host)


class Pingable(Protocol):
    def ping(self, timeout_s: float) -> None: ...


def ping_probe(backend: Pingable, timeout_s: float = PROBE_TIMEOUT_S) -> Callable[[], object]:
    """The probe of a dependency that has ``ping`` (the vector index): one cheap round trip, bounded."""
    return lambda: backend.ping(timeout_s)


@dataclass(frozen=True)
class DeadLetter:
    """A consumed record that will not be processed, and why (``reason``: a short code)."""

    record: ConsumerRecord
    reason: str
    detail: str
    post_id: str = ""

    @property
    def source(self) -> str:
        return source_of(self.record.topic, self.record.partition, self.record.offset)


class Abandoned(Exception):
    """The batch was given up (stop requested while a write kept failing); nothing was committed."""


class Poison(Exception):
    """A write of this batch cannot succeed (refused, or failing while its dependency answers)."""

    def __init__(self, dependency: str, detail: str, target: str, refused: bool) -> None:
        super().__init__(f"{dependency}: {detail}")
        self.dependency = dependency
        self.detail = detail
        self.target = target  # the write (retry's target) that failed
        self.refused = refused  # the dependency refused this input for good (errors.Refused)


@dataclass
class _Stuck:
    dependency: str
    since: float  # monotonic
    detail: str


class StreamWorker(ABC):
    """One consumer-group member; subclasses say what a batch means in :meth:`process`."""

    name = "stream"

    def __init__(self, config: StreamConfig, metrics: StreamMetrics, topics: Sequence[str], group_id: str,
                 batch_size: int, consumer: KafkaConsumer | None = None, producer: KafkaProducer | None = None,
                 probes: Mapping[str, Callable[[], object]] | None = None) -> None:
        c = self.config = config
        self.metrics = metrics
        self.topics = list(topics)
        self.group_id = group_id
        self.batch_size = batch_size
        self.consumer = consumer or KafkaConsumer(
            **c.kafka, group_id=group_id, enable_auto_commit=False, auto_offset_reset=c.auto_offset_reset,
            max_poll_records=batch_size, session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=max(100, c.session_timeout_ms // 3), max_poll_interval_ms=c.max_poll_interval_ms)
        self.producer = producer  # outputs and dead letters; made on first use when not given
        #: dependency -> a cheap call that raises unless it answers (e.g. :func:`ping_probe`): tells
        #: poison from outage
        self.probes: dict[str, Callable[[], object]] = dict(probes or {})
        self.stopped_by = ""
        self.partitions: set[str] = set()  # every partition this worker was assigned
        self.joined_at: float | None = None  # monotonic time of the first assignment (maybe empty)
        self.running = threading.Event()  # set while polling: what /readyz reports
        self._stop = threading.Event()
        self._stuck: _Stuck | None = None
        self._commits = 0
        self._durable: dict[TopicPartition, OffsetAndMetadata] = {}  # stored, not yet committed
        self._passed: set[str] | None = None  # while one record is processed alone: the writes it passed

    # ------------------------------------------------------------------ what a service defines

    @abstractmethod
    def process(self, records: Sequence[ConsumerRecord]) -> Sequence[DeadLetter] | None:
        """Write one batch to every sink, return only when all acknowledged; return the dead
        letter of each record refused (None or empty: all processed)."""

    def store_dead_letters(self, dead: Sequence[DeadLetter]) -> None:
        """A sink of the service's own for dead letters (before they are published); default none."""

    def tick(self) -> None:
        """Called after every poll, records or not (periodic work)."""

    def close(self) -> None:
        """Release the service's own clients (the loop closes ``producer`` and the consumer)."""

    # ------------------------------------------------------------------ helpers for process()

    def parse(self, model: type[M], records: Sequence[ConsumerRecord]) -> tuple[list[tuple[ConsumerRecord, M]],
                                                                                list[DeadLetter]]:
        """Each record's value as a ``model`` contract, or its dead letter."""
        ok: list[tuple[ConsumerRecord, M]] = []
        dead: list[DeadLetter] = []
        for r in records:
            try:
                ok.append((r, parse(model, r.value)))
            except InvalidMessage as exc:
                dead.append(DeadLetter(r, exc.reason, exc.detail))
        return ok, dead

    def send(self, messages: Sequence[Message]) -> None:
        """Publish and wait for every acknowledgement, retried while Kafka is down."""
        if messages:
            self.retry("kafka", lambda: publish(self._producer(), messages))

    # ------------------------------------------------------------------ lifecycle

    def stop(self, why: str = "stop") -> None:
        """Ask the loop to end after the batch in hand (safe from a signal handler)."""
        if not self._stop.is_set():
            self.stopped_by = why
            self._stop.set()

    def readiness(self) -> tuple[bool, str]:
        """What /readyz answers: polling and not stuck retrying a dependency."""
        stuck = self._stuck
        if stuck is not None:
            return False, f"retrying {stuck.dependency} for {time.monotonic() - stuck.since:.0f} s: {stuck.detail}"
        if not self.running.is_set():
            return False, f"{self.name} is not polling (starting or stopping)"
        return True, ""

    def run(self, max_idle: float | None = None) -> None:
        """Poll → process → dead letters → commit until stopped, or ``max_idle`` s without a message.

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
                    self._dead_letter(self._handle(records))
                    self._mark_durable(records)
                    self._fault_point()
                    self.commit()
                    self._observe_batch(len(records), time.perf_counter() - t0)
                    last_message = time.monotonic()  # idle = waiting, not working
                self.tick()
                self._observe_lag()
        except Abandoned as exc:
            log.warning("stopped while a write kept failing: what was not committed will be redelivered",
                        extra={"why": str(exc)})
        finally:
            self.stop("error")  # after a crash too: the retries of commit() and close() give up (Abandoned)
            self.running.clear()
            self.commit()
            self.consumer.close(autocommit=False)
            self.close()
            if self.producer is not None:
                self.producer.close(timeout=10)
        log.info(f"{self.name} stopped", extra={"stopped_by": self.stopped_by})

    # ------------------------------------------------------------------ one batch

    def _handle(self, records: Sequence[ConsumerRecord]) -> list[DeadLetter]:
        """``process(records)``; when that is poison, record by record so only the culprit is dead."""
        try:
            return list(self.retry("batch", lambda: self.process(records)) or ())
        except (Poison, InvalidMessage) as exc:
            log.warning("a batch kept failing: processing it record by record", extra={
                "service": self.name, "records": len(records), "error": str(exc)[:500]})
        outcomes: dict[int, list[DeadLetter] | Poison | InvalidMessage] = {}
        started: dict[int, int] = {}  # record -> when (attempt number) it was last processed
        passed: dict[str, dict[int, int]] = {}  # write -> record -> when it first passed that write
        todo, attempts = range(len(records)), itertools.count()
        while True:
            for i in todo:
                started[i] = next(attempts)
                outcomes[i], writes = self._one(records[i])
                for write in writes:
                    passed.setdefault(write, {}).setdefault(i, started[i])
            # a failure is the message's only if another record passed that very write before it was
            # tried (the write worked meanwhile); else it is the dependency's (an outage, a brief fault)
            todo = [i for i, o in outcomes.items() if isinstance(o, Poison) and not o.refused
                    and not any(j != i and when < started[i] for j, when in passed.get(o.target, {}).items())]
            if not todo:
                self._stuck = None
                return [d for r, o in zip(records, outcomes.values(), strict=True)  # in order: round 1 filled it
                        for d in ([self._refused(r, o)] if isinstance(o, Exception) else o)]
            culprit = outcomes[todo[0]]
            assert isinstance(culprit, Poison)
            log.warning("no other record passed the failing write: waiting for the dependency", extra={
                "service": self.name, "records": len(todo), "error": str(culprit)[:500]})
            self._mark_stuck(culprit.dependency, culprit.detail, time.monotonic())
            if self._stop.wait(self.config.retry_max_s):
                self._stuck = None
                raise Abandoned(f"stop requested while {culprit.dependency} kept failing")

    def _one(self, record: ConsumerRecord) -> tuple[list[DeadLetter] | Poison | InvalidMessage, set[str]]:
        """The outcome of processing ``record`` alone, and the writes (retry targets) it passed."""
        self._passed = set()
        try:
            return list(self.retry("record", lambda: self.process([record])) or ()), self._passed
        except (Poison, InvalidMessage) as exc:
            return exc, self._passed
        finally:
            self._passed = None

    def _refused(self, record: ConsumerRecord, exc: Poison | InvalidMessage) -> DeadLetter:
        if isinstance(exc, InvalidMessage):
            return DeadLetter(record, exc.reason, exc.detail)
        self.metrics.poison.labels(exc.dependency).inc()
        return DeadLetter(record, f"poison_{exc.dependency}", exc.detail)

    def _dead_letter(self, dead: Sequence[DeadLetter]) -> None:
        """Every dead letter in the service's sink and on the dead-letter topic, acknowledged."""
        if not dead:
            return
        self.retry("dead letters", lambda: self.store_dead_letters(dead), poison=False)  # nowhere left to put them
        topic = self.config.deadletter_topic
        letters = [(d, *dead_letter(d.record.value, d.reason, d.detail, d.source, d.post_id)) for d in dead]
        try:
            self.send([(topic, d.record.key, value, headers) for d, value, headers in letters])
        except Poison:  # a letter the broker still refuses (a huge key, a lower broker limit): without its value
            self.send([(topic, None, b"", headers) for _, _, headers in letters])
        for d in dead:
            self.metrics.deadlettered.labels(d.reason).inc()
            log.info("dead-lettered", extra={"service": self.name, "source": d.source, "reason": d.reason,
                                             "detail": d.detail[:300]})

    def _producer(self) -> KafkaProducer:
        if self.producer is None:
            self.producer = durable_producer(self.config.kafka)
        return self.producer

    def _mark_durable(self, records: Sequence[ConsumerRecord]) -> None:
        for r in records:
            self._durable[TopicPartition(r.topic, r.partition)] = OffsetAndMetadata(r.offset + 1, "", -1)

    def _fault_point(self) -> None:
        """Test-only: die between the flushed outputs and the commit (``fault_kill_before_commit``)."""
        self._commits += 1
        if self._commits == self.config.fault_kill_before_commit:
            log.warning("fault injection: SIGKILL before commit", extra={"commit": self._commits})
            os.kill(os.getpid(), signal.SIGKILL)

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)
        log.info("batch stored", extra={"service": self.name, "records": size, "seconds": round(seconds, 3)})
        if seconds * 1000 > self.config.max_poll_interval_ms / 2:
            log.warning("batch took over half of max_poll_interval_ms: lower the batch size or raise "
                        "MEMETRACE_KAFKA_MAX_POLL_INTERVAL_MS", extra={"service": self.name, "seconds": seconds})

    # ------------------------------------------------------------------ offsets and retries

    def commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit the durable offsets (of ``partitions``, default all); a lost group means redelivery."""
        todo = {tp: om for tp, om in self._durable.items() if partitions is None or tp in partitions}
        if not todo:
            return
        try:
            self.retry("kafka", lambda: self.consumer.commit(offsets=todo), poison=False)
        except CommitFailedError as exc:
            log.warning("commit refused (partitions moved to another worker); they will be redelivered there",
                        extra={"partitions": [str(tp) for tp in todo], "error": str(exc)})
        except Abandoned:
            return
        for tp in todo:
            if self._durable.get(tp) is todo[tp]:
                del self._durable[tp]

    def retry(self, target: str, fn: Callable[[], T], poison: bool = True) -> T:
        """``fn()`` until it succeeds, backing off up to ``retry_max_s`` while a dependency is down.

        ``target`` names the write in logs; the metric and readiness name the dependency that failed.
        Raises :class:`Poison` (see the module docstring) when ``poison``, :class:`Abandoned` on stop,
        :class:`StorageDenied` for a disk that refuses, and anything that is no dependency error as is.
        """
        delay, failures, answered = min(0.2, self.config.retry_max_s), 0, 0
        while True:
            started = time.monotonic()
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - sorted just below
                down = _dependency_error(exc)
                if isinstance(down, Refused):
                    if not poison:
                        raise
                    raise Poison(down.dependency, down.detail, target, refused=True) from exc
                if down is None:
                    raise
                failures += 1
                self._retrying(target, down, failures, delay, started)
                # only failures while the dependency answers its probe count, and a failed probe (an
                # outage) starts the count again: a restarting one must not turn the messages in hand
                # into poison. Readiness stays red: the caller decides whether it is poison.
                answered = answered + 1 if poison and self._answers(down.dependency) else 0
                if answered >= self.config.poison_after_retries:
                    raise Poison(down.dependency, f"{down.detail} (failed {answered} times in a row while "
                                                  f"{down.dependency} answered)", target, refused=False) from exc
            else:
                self._stuck = None
                if self._passed is not None:
                    self._passed.add(target)
                return result
            if self._stop.wait(delay):
                self._stuck = None
                raise Abandoned(f"stop requested while {target} was failing")
            delay = min(delay * 2, self.config.retry_max_s)

    def _retrying(self, target: str, down: DependencyDown, failures: int, delay: float, started: float) -> None:
        self._mark_stuck(down.dependency, down.detail, started)  # a failed call may take long: since it started
        self.metrics.retries.labels(down.dependency).inc()
        extra = {"target": down.dependency, "write": target, "error": down.detail[:500], "failures": failures,
                 "retry_in_s": delay}
        if down.dependency == "disk":  # not an outage that passes by itself: someone must act
            log.error("disk full, waiting for space", extra=extra)
        else:
            log.warning("write failed, retrying", extra=extra)

    def _mark_stuck(self, dependency: str, detail: str, since: float) -> None:
        """Readiness red, naming ``dependency``: call before every wait for it."""
        if self._stuck is None or self._stuck.dependency != dependency:
            self._stuck = _Stuck(dependency, since, detail[:300])
        self._stuck.detail = detail[:300]

    def _answers(self, dependency: str) -> bool:
        """Whether ``dependency`` answers its probe (unknown = no: never drop messages in an outage)."""
        probe = self.probes.get(dependency)
        if probe is None:
            return False
        try:
            probe()
        except Exception as exc:  # noqa: BLE001 - any failure means it does not answer
            log.info("probe failed: an outage, not a poison message", extra={
                "target": dependency, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            return False
        return True

    def _observe_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            position = self.consumer.position(tp, timeout_ms=1000)
            if position is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - position))


def _dependency_error(exc: BaseException) -> DependencyDown | Refused | None:
    """What ``exc`` means to the loop: a dependency down, a refused message, or None (not ours)."""
    if isinstance(exc, (DependencyDown, Refused)):
        return exc
    if isinstance(exc, KafkaError):
        return None if isinstance(exc, CommitFailedError) else kafka_error(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return DependencyDown("disk", f"no space left writing {exc.filename or 'a local file'} ({exc.strerror}): "
                                      "free space on that volume or raise its quota; the worker resumes by itself")
    if isinstance(exc, OSError) and exc.errno in DISK_DENIED:
        what = exc.filename or "a local file"
        log.error("disk refuses writes", extra={"path": str(what), "error": exc.strerror})
        raise StorageDenied(f"cannot write {what} ({exc.strerror}): make MEMETRACE_DATA_DIR (or the path's "
                            "setting) writable by this user, or point it at a writable volume") from exc
    return None


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
    """Serve /metrics, /healthz, /readyz (ready while polling and not stuck), stop on SIGTERM/SIGINT, run."""
    c = worker.config
    server = serve(worker.metrics.registry, c.metrics_port, c.metrics_host, ready=worker.readiness)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: _stop_from_signal(worker, signum))
    try:
        worker.run(max_idle)
    finally:
        if server is not None:
            server.shutdown()
