"""The consume loop's one rule (memetrace/stream.py): every consumed message is processed or
dead-lettered with a reason; outages are waited out (readiness red), poison messages are not.

These specify the loop on in-memory Kafka stand-ins (a consumer that replays a list of records,
a producer that acknowledges at once and refuses what a real one refuses for size); the same
loop on the real broker is covered by test_fuzz_messages.py and test_stream_faults.py.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import make_settings
from kafka import OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from prometheus_client import CollectorRegistry

from memetrace.clusterer.graph import build_graph
from memetrace.errors import DependencyDown
from memetrace.messages import H_REASON, H_SHA256, H_SIZE, H_TRUNCATED, MatchEvent
from memetrace.metrics import StreamMetrics, health_app
from memetrace.models import Match
from memetrace.stream import DeadLetter, StorageDenied, StreamConfig, StreamWorker

TOPIC = "in"
MAX_REQUEST = 1_048_576  # KafkaProducer's default max_request_size


def record(offset: int, value: bytes | None, partition: int = 0, topic: str = TOPIC) -> ConsumerRecord:
    return ConsumerRecord(topic, partition, -1, offset, 0, 0, b"k", value, [], None, 1, len(value or b""), 0)


class ListConsumer:
    """Hands out ``records`` in polls of at most ``max_records``; remembers the commits."""

    def __init__(self, records: Sequence[ConsumerRecord]) -> None:
        self.todo = list(records)
        self.commits: list[dict[TopicPartition, OffsetAndMetadata]] = []

    def subscribe(self, topics: Sequence[str], listener: Any) -> None:
        listener.on_partitions_assigned(sorted({TopicPartition(r.topic, r.partition) for r in self.todo}))

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        batch, self.todo = self.todo[:max_records], self.todo[max_records:]
        if not batch:
            time.sleep(timeout_ms / 1000)
        return {TopicPartition(TOPIC, 0): batch} if batch else {}

    def commit(self, offsets: dict) -> None:
        self.commits.append(dict(offsets))

    def committed_offset(self, partition: int = 0) -> int:
        return max((o[TopicPartition(TOPIC, partition)].offset for o in self.commits
                    if TopicPartition(TOPIC, partition) in o), default=0)

    def assignment(self) -> set:
        return set()

    def close(self, autocommit: bool) -> None:
        pass


class AckingProducer:
    """Acknowledges every send; refuses one over ``max_request_size`` as KafkaProducer.send does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, list]] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"", headers: Any = None) -> Any:
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v) for k, v in headers or ())
        if size > MAX_REQUEST:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        self.sent.append((topic, key, value, list(headers or ())))
        return SimpleNamespace(get=lambda timeout: None)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass

    def on(self, topic: str) -> list[tuple[str, bytes | None, bytes, list]]:
        return [m for m in self.sent if m[0] == topic]


class Worker(StreamWorker):
    """Parses MatchEvents; ``fail(records)`` may raise to play a dependency; ``outputs`` go to ``out``."""

    name = "test"

    def __init__(self, tmp: Path, records: Sequence[ConsumerRecord], fail: Callable[[Sequence], None] = lambda rs: None,
                 batch: int = 10, **settings: Any) -> None:
        s = make_settings(tmp, retry_max_s=0.02, poison_after_retries=3, **settings)
        self.producer_ = AckingProducer()
        super().__init__(StreamConfig.from_settings(s), StreamMetrics(CollectorRegistry()), [TOPIC], "g", batch,
                         ListConsumer(records), self.producer_)
        self.fail = fail
        self.stored: list[bytes] = []
        self.outputs: list[bytes] = []

    def process(self, records: Sequence[ConsumerRecord]) -> list[DeadLetter]:
        events, dead = self.parse(MatchEvent, records)
        if events:  # like the services: no write without rows (an invalid record never reaches Milvus)
            self.retry("milvus", lambda: self.fail([r for r, _ in events]))
        self.send([("out", None, v, []) for v in self.outputs])
        self.stored.extend(r.value for r, _ in events)
        return dead

    def dead(self) -> dict[int, str]:
        """offset of the consumed record -> reason, from the dead-letter topic's headers."""
        out = {}
        for _, _, _, headers in self.producer_.on(self.config.deadletter_topic):
            h = dict(headers)
            out[int(h["memetrace-source"].decode().rsplit("/", 1)[1])] = h[H_REASON].decode()
        return out

    def poison_count(self, dependency: str) -> float:
        return self.metrics.registry.get_sample_value("memetrace_poison_messages_total", {"dependency": dependency}) or 0


def edge(a: int, b: int) -> bytes:
    return MatchEvent(a=a, b=b, inliers=20, kind="full").to_bytes()


def test_invalid_values_are_dead_lettered_and_valid_ones_processed(tmp_path: Path) -> None:
    values = [edge(1, 2), b"[" * 100_000, b'{"a": 1, "b": 2, "inliers": NaN, "kind": "full"}', None, b"",
              b"\xff\xfe", edge(3, 4), b'{"a": 9223372036854775808, "b": 18446744073709551616, "inliers": 1, "kind": "full"}',
              b'{"a": -1, "b": 2, "inliers": 1, "kind": "full"}', b'{"a": 5, "b": 5, "inliers": 1, "kind": "full"}',
              b'{"a": "1", "b": 2, "inliers": 1, "kind": "full"}', edge(5, 6)]
    w = Worker(tmp_path, [record(i, v) for i, v in enumerate(values)], batch=5)
    w.run(max_idle=0.2)
    assert w.stored == [edge(1, 2), edge(3, 4), edge(5, 6)]
    dead = w.dead()
    assert sorted(dead) == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert dead[1] == "too_deep" and dead[3] == "invalid_json" and dead[5] == "invalid_json"
    assert {dead[i] for i in (2, 7, 8, 9, 10)} == {"invalid_match_event"}
    assert w.consumer.committed_offset() == len(values)
    assert w.metrics.registry.get_sample_value("memetrace_deadlettered_total", {"reason": "too_deep"}) == 1


def test_a_dead_letter_too_large_for_the_broker_keeps_a_prefix_its_size_and_hash(tmp_path: Path) -> None:
    huge = b'{"a": 1, "b": 2, "inliers": 3, "kind": "' + b"x" * 5_000_000 + b'"}'
    w = Worker(tmp_path, [record(0, huge), record(1, edge(1, 2))])
    w.run(max_idle=0.2)
    [(_, _, value, headers)] = w.producer_.on(w.config.deadletter_topic)
    h = dict(headers)
    assert h[H_REASON] == b"too_large" and h[H_SIZE] == str(len(huge)).encode() and h[H_TRUNCATED] == b"1"
    assert len(value) < MAX_REQUEST and huge.startswith(value) and len(h[H_SHA256]) == 64
    assert w.stored == [edge(1, 2)] and w.consumer.committed_offset() == 2


def test_a_poison_message_is_isolated_dead_lettered_and_counted_while_the_batch_is_stored(tmp_path: Path) -> None:
    """Milvus answers, but every write holding the message (1, 3) fails: after poison_after_retries
    the batch goes record by record; only that one is dead-lettered, as poison_milvus."""
    def fail(records: Sequence[ConsumerRecord]) -> None:
        if any(r.value == edge(1, 3) for r in records):
            raise DependencyDown("milvus", "Python int too large to convert to C long")

    values = [edge(1, 2), edge(1, 3), edge(2, 3), edge(4, 5)]
    w = Worker(tmp_path, [record(i, v) for i, v in enumerate(values)], fail)
    w.probes["milvus"] = lambda: None  # Milvus answers other calls
    w.run(max_idle=0.2)
    assert w.stored == [edge(1, 2), edge(2, 3), edge(4, 5)]
    assert w.dead() == {1: "poison_milvus"}
    assert w.poison_count("milvus") == 1
    assert w.consumer.committed_offset() == 4


def test_a_batch_whose_every_record_fails_is_the_dependency_not_poison(tmp_path: Path) -> None:
    """Milvus answers its probe but refuses every write for a while (e.g. loading its collections
    after a restart): nothing is dead-lettered, everything is stored once writes pass again."""
    until = time.monotonic() + 1.5

    def fail(records: Sequence[ConsumerRecord]) -> None:
        if time.monotonic() < until:
            raise DependencyDown("milvus", "collection not loaded")

    w = Worker(tmp_path, [record(i, edge(1, i + 2)) for i in range(3)], fail)
    w.probes["milvus"] = lambda: None
    w.run(max_idle=0.2)
    assert w.dead() == {} and w.poison_count("milvus") == 0
    assert sorted(w.stored) == sorted(edge(1, i + 2) for i in range(3)) and w.consumer.committed_offset() == 3


class ReadinessAtWaits(threading.Event):
    """The worker's stop event: records what /readyz answers each time the loop waits (backs off)."""

    def __init__(self, worker: StreamWorker) -> None:
        super().__init__()
        self.worker = worker
        self.seen: list[tuple[bool, str]] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.seen.append(self.worker.readiness())
        return super().wait(timeout)


def failing_for(seconds: float) -> Callable[[Sequence[ConsumerRecord]], None]:
    """A Milvus that refuses every write for ``seconds`` (e.g. reloading its collections)."""
    until = time.monotonic() + seconds

    def fail(records: Sequence[ConsumerRecord]) -> None:
        if time.monotonic() < until:
            raise DependencyDown("milvus", "collection not loaded")
    return fail


def test_a_one_record_batch_failing_while_milvus_answers_is_waited_for_not_poison(tmp_path: Path) -> None:
    """At low traffic most polls hold one record: with no other record to prove Milvus writable, a
    few seconds of failed writes are the dependency's, never that message's; readiness red meanwhile."""
    w = Worker(tmp_path, [record(0, edge(1, 2))], failing_for(1.0))
    w.probes["milvus"] = lambda: None
    waits = w._stop = ReadinessAtWaits(w)
    w.run(max_idle=0.2)
    assert w.dead() == {} and w.poison_count("milvus") == 0
    assert w.stored == [edge(1, 2)] and w.consumer.committed_offset() == 1
    backoffs = waits.seen[:-1]  # the last wait is the idle poll's, after the batch
    assert len(backoffs) > 10 and all(not ok and msg.startswith("retrying milvus for ") for ok, msg in backoffs)


def test_an_invalid_record_beside_valid_ones_in_a_milvus_fault_does_not_make_them_poison(tmp_path: Path) -> None:
    """The invalid record (a plain dead letter) never reaches Milvus, so it proves nothing about it:
    the valid ones wait for Milvus instead of being dead-lettered as poison."""
    w = Worker(tmp_path, [record(0, None), record(1, edge(1, 2)), record(2, edge(1, 3))], failing_for(1.0))
    w.probes["milvus"] = lambda: None
    waits = w._stop = ReadinessAtWaits(w)
    w.run(max_idle=0.2)
    assert w.dead() == {0: "invalid_json"} and w.poison_count("milvus") == 0
    # in either order: when the window ends during the record-by-record retry, the second may pass first
    assert sorted(w.stored) == sorted([edge(1, 2), edge(1, 3)]) and w.consumer.committed_offset() == 3
    assert all(not ok and msg.startswith("retrying milvus for ") for ok, msg in waits.seen[:-1])


def test_failures_counted_before_an_outage_do_not_carry_over_after_it(tmp_path: Path) -> None:
    """Two write failures while Milvus answers, then an outage (probe fails), again and again ("not
    loaded" after each restart): never poison_after_retries (3) in a row, so no poison."""
    schedule = iter(["answers", "answers", "down"] * 4 + ["answers", "answers"])
    state = {"now": "answers"}

    def fail(records: Sequence[ConsumerRecord]) -> None:
        if any(r.offset == 1 for r in records) and (step := next(schedule, None)) is not None:
            state["now"] = step
            raise DependencyDown("milvus", "collection not loaded" if step == "answers" else "connection refused")

    def probe() -> None:
        if state["now"] == "down":
            raise DependencyDown("milvus", "connection refused")

    w = Worker(tmp_path, [record(0, edge(1, 2)), record(1, edge(1, 3))], fail)
    w.probes["milvus"] = probe
    w.run(max_idle=0.2)
    assert w.dead() == {} and w.poison_count("milvus") == 0
    assert w.stored == [edge(1, 2), edge(1, 3)] and next(schedule, None) is None


def test_a_crash_does_not_hang_in_the_clusterers_last_publish_while_the_board_is_down(tmp_path: Path) -> None:
    """A bug stops the worker; its close() reclusters and publishes: with the board down, that retry
    must give up (the worker is stopping) so the process exits with the bug."""
    from memetrace.clusterer.metrics import ClusterMetrics
    from memetrace.clusterer.state import MemoryGraphState
    from memetrace.clusterer.worker import ClusterWorker

    class DownBoard:
        def publish(self, *args: Any) -> None:
            raise DependencyDown("milvus", "connection refused")

    def bug(rows: Any) -> None:
        raise RuntimeError("a bug in the state")

    state = MemoryGraphState()
    state.add_images = bug  # type: ignore[method-assign]
    s = make_settings(tmp_path, retry_max_s=0.02)
    w = ClusterWorker(s, state, DownBoard(), ClusterMetrics(CollectorRegistry()), 3600.0,
                      ListConsumer([record(0, edge(1, 2))]))
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            w.run(max_idle=0.2)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            crashed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=10)
    hung = t.is_alive()
    w.stop()  # ends a hung run too
    t.join(timeout=10)
    assert not hung, "the worker hung in close() after a crash"
    assert [str(e) for e in crashed] == ["a bug in the state"]


def test_an_outage_is_waited_out_with_readiness_red_and_nothing_dead_lettered(tmp_path: Path) -> None:
    down = threading.Event()
    down.set()

    def fail(records: Sequence[ConsumerRecord]) -> None:
        if down.is_set():
            raise DependencyDown("milvus", "connection refused")

    def probe() -> None:
        if down.is_set():
            raise DependencyDown("milvus", "connection refused")

    w = Worker(tmp_path, [record(i, edge(1, i + 2)) for i in range(3)], fail)
    w.probes["milvus"] = probe
    app = health_app(w.metrics.registry, w.readiness)
    t = threading.Thread(target=w.run, kwargs={"max_idle": 0.5})
    t.start()
    try:
        deadline = time.monotonic() + 10
        while w.metrics.registry.get_sample_value("memetrace_retries_total", {"target": "milvus"}) < 20:
            assert time.monotonic() < deadline, "the worker did not keep retrying"
            time.sleep(0.02)
        status, body = _get(app, "/readyz")
        assert status.startswith("503") and body.startswith(b"not ready: retrying milvus for ")
        assert b"connection refused" in body
        assert _get(app, "/healthz")[0].startswith("200")
        assert w.dead() == {} and w.consumer.commits == []  # many failures, but Milvus is down: no poison
        down.clear()
        deadline = time.monotonic() + 10
        while w.consumer.committed_offset() < 3:
            assert time.monotonic() < deadline, "not resumed after Milvus came back"
            time.sleep(0.02)
        assert w.readiness() == (True, "")
    finally:
        t.join(timeout=10)
    assert len(w.stored) == 3 and w.dead() == {} and w.poison_count("milvus") == 0


def test_kafka_retriable_errors_are_an_outage_of_kafka(tmp_path: Path) -> None:
    calls = []

    def fail(records: Sequence[ConsumerRecord]) -> None:
        calls.append(1)
        if len(calls) < 4:
            raise KafkaConnectionError("broker gone")

    w = Worker(tmp_path, [record(0, edge(1, 2))], fail)
    w.run(max_idle=0.2)
    assert w.stored == [edge(1, 2)]
    assert w.metrics.registry.get_sample_value("memetrace_retries_total", {"target": "kafka"}) == 3


class Big(Worker):
    """Outputs a value over the producer's limit for the records at ``big`` offsets."""

    big: frozenset[int] = frozenset({1})

    def process(self, records: Sequence[ConsumerRecord]) -> list[DeadLetter]:
        self.outputs = [b"x" * 2_000_000] if any(r.offset in self.big for r in records) else [b"ok"]
        return super().process(records)


@pytest.mark.parametrize("batch", [10, 1])
def test_an_output_refused_for_its_size_is_poison_at_once_not_an_endless_retry(tmp_path: Path, batch: int) -> None:
    w = Big(tmp_path, [record(i, edge(1, i + 2)) for i in range(3)], batch=batch)
    w.run(max_idle=0.2)
    assert w.dead() == {1: "poison_kafka"} and w.poison_count("kafka") == 1
    assert w.stored == [edge(1, 2), edge(1, 4)] and w.consumer.committed_offset() == 3
    assert w.metrics.registry.get_sample_value("memetrace_retries_total", {"target": "kafka"}) == 0


def test_a_batch_whose_every_record_is_refused_is_dead_lettered_at_once_not_waited_for(tmp_path: Path) -> None:
    w = Big(tmp_path, [record(i, edge(1, i + 2)) for i in range(3)])
    w.big = frozenset({0, 1, 2})
    t = threading.Thread(target=w.run, kwargs={"max_idle": 0.2}, daemon=True)
    t.start()
    t.join(timeout=10)
    hung = t.is_alive()
    w.stop()
    t.join(timeout=10)
    assert not hung, "the worker kept waiting on records Kafka refuses for good"
    assert w.dead() == {0: "poison_kafka", 1: "poison_kafka", 2: "poison_kafka"} and w.poison_count("kafka") == 3
    assert w.stored == [] and w.consumer.committed_offset() == 3


def test_a_full_disk_is_waited_for_as_disk_not_milvus(tmp_path: Path) -> None:
    calls = []

    def fail(records: Sequence[ConsumerRecord]) -> None:
        calls.append(1)
        if len(calls) < 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "features" / "1.npz"))

    w = Worker(tmp_path, [record(0, edge(1, 2))], fail)
    w.probes["milvus"] = lambda: None
    w.run(max_idle=0.2)
    reg = w.metrics.registry
    assert reg.get_sample_value("memetrace_retries_total", {"target": "disk"}) == 5
    assert reg.get_sample_value("memetrace_retries_total", {"target": "milvus"}) == 0
    assert w.stored == [edge(1, 2)] and w.dead() == {}  # waited, never poison


def test_a_disk_that_refuses_writes_stops_the_worker_naming_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "features" / "1.npz")

    def fail(records: Sequence[ConsumerRecord]) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    w = Worker(tmp_path, [record(0, edge(1, 2))], fail)
    with pytest.raises(StorageDenied, match=path) as err:
        w.run(max_idle=0.2)
    assert "writable" in str(err.value)
    assert w.consumer.commits == [] and w.dead() == {} and w.readiness()[0] is False


def test_an_unknown_error_is_a_bug_and_stops_the_worker_without_committing(tmp_path: Path) -> None:
    def fail(records: Sequence[ConsumerRecord]) -> None:
        raise ConnectionError("not wrapped in DependencyDown by its adapter")

    w = Worker(tmp_path, [record(0, edge(1, 2))], fail)
    with pytest.raises(ConnectionError):
        w.run(max_idle=0.2)
    assert w.consumer.commits == [] and w.dead() == {}


def test_edges_to_images_never_seen_are_held_back_from_the_graph() -> None:
    g = build_graph({1: 10, 2: 10, 3: 10}, [Match(1, 2, 30, "full"), Match(2, 99, 30, "full"), Match(3, 3, 9, "full")])
    assert sorted(g.edges) == [(1, 2)] and sorted(g.nodes) == [1, 2, 3]
    g = build_graph({1: 10, 2: 10, 3: 10, 99: 10}, [Match(1, 2, 30, "full"), Match(2, 99, 30, "full")])
    assert sorted(g.edges) == [(1, 2), (2, 99)]  # both images seen: the edge counts


def _get(app: Any, path: str) -> tuple[str, bytes]:
    out = {}
    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda status, headers: out.update(s=status)))
    return out["s"], body
