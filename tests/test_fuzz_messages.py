"""Hostile messages on every topic: each is processed or dead-lettered with a reason, no worker stops.

A seeded generator (:func:`hostile`) writes what an attacker or a buggy producer sends: nested
brackets, huge strings, NaN and Infinity, ids at 2^63 and 2^64, negative ids, wrong types,
invalid UTF-8, empty values, tombstones, self-loops, unknown schema versions, mixed with valid
messages, many of them at their bounds (the longest ids in UTF-8 bytes, non-ASCII text, ids at
2^63-1, posting times at their extremes): those must be processed, never dead-lettered. First
:func:`memetrace.messages.parse` on thousands of them per contract (nothing but a model or
InvalidMessage may come out), then a thousand per topic through the real broker (Tansu on
127.0.0.1) into the real match and cluster workers and the ingest worker (the file: ~2 minutes).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from kafka import KafkaProducer
from kafka_broker import Broker, kafka_broker  # noqa: F401
from prometheus_client import CollectorRegistry
from streaming import (  # noqa: F401
    PhotoServer,
    WorkerProcess,
    ingest_env,
    milvus_counts,
    milvus_server,
    photo_server,
    read_topic,
    settings_from,
)

from memetrace.clusterer.metrics import ClusterMetrics
from memetrace.clusterer.state import SqliteGraphState
from memetrace.clusterer.worker import ClusterWorker
from memetrace.kafka_clients import ensure_topics
from memetrace.matcher.metrics import MatchMetrics
from memetrace.matcher.matching import MatchConfig, Matcher
from memetrace.matcher.worker import MatchWorker
from memetrace.messages import (
    H_REASON,
    H_SOURCE,
    MAX_ID,
    ImageEvent,
    InvalidMessage,
    MatchEvent,
    Post,
    PostRef,
    parse,
    source_of,
)
from memetrace.settings import Settings

SEED = 20261201
UNIT_CASES = 3000  # per contract
KAFKA_CASES = 1000  # per topic


# ----------------------------------------------------------------------------- the generator


# valid at their bounds: the longest post ids and platforms in UTF-8 bytes (3-byte CJK, 4-byte
# emoji, 2-byte accents), free text longer in bytes than the stores keep, ids and times at their extremes
EDGE_POST_IDS = ["日" * 341 + "x", "😀" * 256, "é" * 512, "a" * 1024, MAX_ID, -MAX_ID, 0, "ид-1"]
EDGE_PLATFORMS = ["😀" * 16, "é" * 32, "p" * 64, "微博"]
EDGE_AUTHORS = ["日" * 256, "😀" * 256, "a" * 256]
EDGE_POSTED_AT = ["1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-23:59", 0, 253402300799,
                  "2024-05-01T10:00:00+14:00"]
URL_BYTES = 4096
# meta at its bounds: 32 keys of 64 bytes with 2-byte values (4,034 bytes of JSON), the longest key
# and value in bytes, numbers and booleans (kept as their text)
EDGE_META = [{"日" * 21 + f"{i:c}": "é" * 28 for i in range(65, 97)}, {"日" * 21 + "x": "😀" * 256},
             {"likes": 3, "ratio": -0.25, "nsfw": True}, {}]


def _edge(rng: random.Random, usual: Any, edges: Sequence[Any]) -> Any:
    return rng.choice(edges) if rng.random() < 0.4 else usual


def edge_url(url: str) -> str:
    """``url`` padded with a query of 2-byte characters to the longest URL a post may carry."""
    pad = "&pad=" if "?" in url else "?pad="
    return url + pad + "é" * ((URL_BYTES - len((url + pad).encode())) // 2)


def valid(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "post":
        url = f"https://example.org/{rng.randrange(10**6)}.jpg"
        doc = {"post_id": _edge(rng, f"p{rng.randrange(10**9)}", EDGE_POST_IDS),
               "url": _edge(rng, url, [edge_url(url)]),
               "platform": _edge(rng, rng.choice(["", "x", "mastodon"]), EDGE_PLATFORMS),
               "author": _edge(rng, "a" * rng.randrange(20), EDGE_AUTHORS)}
        doc |= {"meta": rng.choice(EDGE_META)} if rng.random() < 0.3 else {}
        return doc | ({"posted_at": rng.choice(EDGE_POSTED_AT)} if rng.random() < 0.4 else {})
    if kind == "image":
        return {"v": 1, "image_id": _edge(rng, rng.randrange(MAX_ID + 1), [0, MAX_ID]),
                "nb_points": _edge(rng, rng.randrange(5000), [0, 1_000_000]),
                "post": {"post_id": _edge(rng, f"p{rng.randrange(10**9)}", [str(p) for p in EDGE_POST_IDS]),
                         "posted_at": rng.choice([-1, 0, 1_700_000_000, 2**62]),
                         "platform": _edge(rng, "x", EDGE_PLATFORMS)}}
    a = _edge(rng, rng.randrange(MAX_ID), [1, MAX_ID - 1])  # not 0: no edge between two edge images
    return {"v": 1, "a": a, "b": _edge(rng, rng.randrange(a + 1, MAX_ID + 1), [MAX_ID]),
            "inliers": _edge(rng, rng.randrange(1000), [0, 1_000_000]), "kind": rng.choice(["full", "partial"])}


NUMBER_FIELDS = {"post": ["post_id"], "image": ["image_id", "nb_points"], "match": ["a", "b", "inliers"]}
REQUIRED = {"post": ["post_id", "url"], "image": ["image_id", "nb_points", "post"], "match": ["a", "b", "inliers", "kind"]}
BAD_NUMBERS = {"post": [2**63, 2**64, 1.5, True, None, [], {}, ""],  # a post id may be a number below 2^63
               "image": [2**63, 2**64, 2**64 + 1, -1, -(2**63) - 1, 10**400, 1.5, True, None, "12", [], {}]}
BAD_NUMBERS["match"] = BAD_NUMBERS["image"]


def _raw(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def hostile(kind: str, rng: random.Random, max_bytes: int) -> bytes | None:
    """One malformed message for a topic of ``kind`` (post, image, match), at most ``max_bytes``."""
    doc = valid(kind, rng)
    field = rng.choice(NUMBER_FIELDS[kind])
    pick = rng.randrange(16)
    if pick == 0:
        depth = rng.choice([40, 1000, 100_000])
        return b"[" * min(depth, max_bytes // 2) + b"]" * min(depth, max_bytes // 2)
    if pick == 1:  # nesting inside a field that is otherwise ignored
        return _raw(doc)[:-1] + b', "text": ' + b'{"x":' * 200 + b"1" + b"}" * 200 + b"}"
    if pick == 2:  # a huge string where a short one belongs
        huge = "x" * rng.choice([5000, 100_000, min(max_bytes - 200, 2_000_000)])
        (doc["post"] if kind == "image" else doc)["kind" if kind == "match" else "post_id"] = huge
        return _raw(doc)
    if pick == 3:  # NaN or Infinity where a number belongs
        doc["posted_at" if kind == "post" else field] = "__NUMBER__"
        return _raw(doc).replace(b'"__NUMBER__"', rng.choice([b"NaN", b"Infinity", b"-Infinity"]))
    if pick == 4:
        doc[field] = rng.choice(BAD_NUMBERS[kind])
        return _raw(doc)
    if pick == 5:
        return rng.choice([b"", b" ", b"null", b"[]", b"1", b'"text"', b"true"])
    if pick == 6:
        return None  # tombstone
    if pick == 7:
        return b'{"post_id": "\xff\xfe", "url": "\xc3\x28"}' if kind == "post" else _raw(doc)[:-1] + b', "\xff": 1}'
    if pick == 8:
        del doc[rng.choice(REQUIRED[kind])]
        return _raw(doc)
    if pick == 9:
        return _raw(doc)[: rng.randrange(1, len(_raw(doc)))]  # cut short
    if pick == 10 and kind == "post":  # a meta over its bounds, nested, or not a mapping
        doc["meta"] = rng.choice([{f"k{i}": "v" for i in range(33)}, {"k": "v" * 1025}, {"k" * 65: "v"},
                                  {f"k{i}": "é" * 500 for i in range(5)}, {"": "v"}, {"k": {"x": "y"}}, {"k": [1]},
                                  {"k": None}, {"k": float("nan")}, ["k", "v"], "k=v"])
        return _raw(doc)
    if pick == 10 and kind == "match":
        doc["b"] = doc["a"] - rng.choice([0, 1])  # self-loop or reversed
        return _raw(doc)
    if pick == 11:
        doc["v"] = rng.choice([0, 2, 99, "2", None])
        return _raw(doc)
    if pick == 12 and kind == "post":
        doc["url"] = rng.choice(["ftp://x/y.jpg", "javascript:alert(1)", "http://", "http://[::1", "x" * 5000])
        return _raw(doc)
    if pick == 13 and kind == "image":
        doc["post"] = rng.choice(["p1", None, [], {"post_id": ""}, {"post_id": "p", "posted_at": 2**70}])
        return _raw(doc)
    if pick == 14:
        return rng.randbytes(rng.randrange(1, 300))
    doc[field] = rng.choice([{"$gt": 1}, [doc.get(field)]])
    return _raw(doc)


def mixed(kind: str, n: int, seed: int, max_bytes: int) -> Iterator[tuple[bytes | None, bool]]:
    """``n`` messages, about a quarter valid: (value, is_valid)."""
    rng = random.Random(seed)
    for _ in range(n):
        if rng.random() < 0.25:
            yield json.dumps(valid(kind, rng), ensure_ascii=False).encode(), True  # raw UTF-8 on the wire
        else:
            yield hostile(kind, rng, max_bytes), False


MODELS = {"post": Post, "image": ImageEvent, "match": MatchEvent}


# ----------------------------------------------------------------------------- parse()


@pytest.mark.parametrize("kind", list(MODELS))
def test_parse_gives_a_bounded_model_or_invalid_message_for_thousands_of_hostile_values(kind: str) -> None:
    model = MODELS[kind]
    accepted = refused = 0
    for raw, ok in mixed(kind, UNIT_CASES, SEED, 5_000_000):
        try:
            msg = parse(model, raw)
        except InvalidMessage as exc:
            assert not ok, f"valid {kind} refused: {exc} ({raw[:200]!r})"
            assert exc.reason and exc.detail and len(exc.detail) <= 1024
            refused += 1
            continue
        accepted += 1
        if isinstance(msg, ImageEvent):
            assert 0 <= msg.image_id <= MAX_ID
        elif isinstance(msg, MatchEvent):
            assert 0 <= msg.a < msg.b <= MAX_ID
        assert len(msg.to_bytes()) < 20_000  # every field bounded: what we publish stays small
    assert accepted >= UNIT_CASES // 5 and refused >= UNIT_CASES // 2, (accepted, refused)


def _post(**fields: Any) -> bytes:
    return json.dumps({"post_id": "p", "url": "https://example.org/a.jpg"} | fields, ensure_ascii=False).encode()


@pytest.mark.parametrize(("field", "value", "ok"), [
    ("post_id", "日" * 341 + "x", True), ("post_id", "😀" * 256, True), ("post_id", "日" * 342, False),
    ("post_id", "😀" * 256 + "x", False), ("post_id", "a" * 1025, False),
    ("url", edge_url("https://example.org/a.jpg"), True), ("url", edge_url("https://example.org/a.jpg") + "é", False),
    ("platform", "😀" * 16, True), ("platform", "😀" * 16 + "x", False), ("author", "日" * 256, True),
])
def test_ids_are_bounded_in_utf8_bytes_as_the_stores_keep_them(field: str, value: str, ok: bool) -> None:
    """A post id, URL or platform over its bytes is refused, never cut by a store (two posts would merge)."""
    if ok:
        assert getattr(parse(Post, _post(**{field: value})), field) == value
    else:
        with pytest.raises(InvalidMessage, match=f"{field}: .*at most"):
            parse(Post, _post(**{field: value}))


def test_posting_times_fit_the_image_event() -> None:
    """Every accepted posting time fits the ImageEvent the ingest publishes; earlier than 1970 is refused."""
    for at in EDGE_POSTED_AT:
        post = parse(Post, _post(posted_at=at))
        assert PostRef(post_id=post.post_id, posted_at=post.posted_at_unix()).posted_at >= 0
    for at in ["1969-12-31T23:59:59Z", "0001-01-01T00:00:00Z", -1]:
        with pytest.raises(InvalidMessage, match="before 1970"):
            parse(Post, _post(posted_at=at))


# ----------------------------------------------------------------------------- through Kafka


def settings_for(tmp: Path, broker: Broker) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return make_settings(tmp, kafka_bootstrap_servers=broker.bootstrap, kafka_images_topic=f"fz-img-{tag}",
                         kafka_matches_topic=f"fz-match-{tag}", kafka_deadletter_topic=f"fz-dead-{tag}",
                         kafka_match_group_id=f"fz-m-{tag}", kafka_cluster_group_id=f"fz-c-{tag}",
                         kafka_topic_partitions=2, kafka_session_timeout_ms=2000, retry_max_s=0.5)


def send_all(s: Settings, topic: str, values: Sequence[bytes | None]) -> list[str]:
    """Produce ``values`` in order on one partition; their sources (topic/partition/offset)."""
    producer = KafkaProducer(bootstrap_servers=s.kafka_bootstrap_servers, max_request_size=2_000_000, linger_ms=5)
    futures = [producer.send(topic, key=b"fuzz", value=v, partition=0) for v in values]
    producer.flush()
    sources = [source_of(m.topic, m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
    producer.close()
    return sources


def dead_letters(s: Settings, expected: int) -> dict[str, str]:
    out = {}
    for r in read_topic(s, s.kafka_deadletter_topic, expected, timeout=30):
        h = dict(r.headers)
        out[h[H_SOURCE].decode()] = h[H_REASON].decode()
    return out


class _NoMilvus:
    """The matcher's store when the matching itself is stubbed: its probe answers."""

    def count(self) -> int:
        return 0


class _Board:
    def __init__(self) -> None:
        self.published: list[tuple] = []

    def publish(self, *args: Any) -> None:
        self.published.append(args)


def _split(values: Sequence[tuple[bytes | None, bool]], sources: Sequence[str]) -> tuple[list, set[str]]:
    good = [v for (v, ok) in values if ok]
    bad = {src for (_, ok), src in zip(values, sources, strict=True) if not ok}
    return good, bad


def test_match_worker_dead_letters_every_hostile_image_event_and_matches_every_valid_one(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    s = settings_for(tmp_path, kafka_broker)
    ensure_topics(s, [s.kafka_images_topic, s.kafka_matches_topic, s.kafka_deadletter_topic], partitions=1)
    values = list(mixed("image", KAFKA_CASES, SEED, 900_000))
    sources = send_all(s, s.kafka_images_topic, [v for v, _ in values])
    good, bad = _split(values, sources)
    worker = MatchWorker(s, Matcher(MatchConfig.from_settings(s), _NoMilvus(), None), MatchMetrics(CollectorRegistry()))
    seen: list[int] = []
    worker.matcher.match_stored = lambda ids, call: seen.extend(ids) or []
    worker.run(max_idle=3)
    assert worker.stopped_by == "max_idle"
    assert sorted(seen) == sorted({json.loads(v)["image_id"] for v in good})
    dead = dead_letters(s, len(bad))
    assert set(dead) == bad, f"{len(set(dead) ^ bad)} messages neither processed nor dead-lettered"
    assert all(reason.startswith(("invalid_", "too_")) for reason in dead.values()), set(dead.values())


def test_cluster_worker_dead_letters_every_hostile_event_and_stores_every_valid_one(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    s = settings_for(tmp_path, kafka_broker)
    ensure_topics(s, [s.kafka_images_topic, s.kafka_matches_topic, s.kafka_deadletter_topic], partitions=1)
    images = list(mixed("image", KAFKA_CASES, SEED + 1, 900_000))
    matches = list(mixed("match", KAFKA_CASES, SEED + 2, 900_000))
    good_images, bad = _split(images, send_all(s, s.kafka_images_topic, [v for v, _ in images]))
    good_matches, bad_matches = _split(matches, send_all(s, s.kafka_matches_topic, [v for v, _ in matches]))
    state = SqliteGraphState(tmp_path / "state.db")
    worker = ClusterWorker(s, state, _Board(), ClusterMetrics(CollectorRegistry()), 3600.0)
    worker.run(max_idle=3)
    assert worker.stopped_by == "max_idle"
    assert set(state.images()) == {json.loads(v)["image_id"] for v in good_images}
    assert {(m.a, m.b) for m in state.matches()} == {(json.loads(v)["a"], json.loads(v)["b"]) for v in good_matches}
    dead = dead_letters(s, len(bad) + len(bad_matches))
    assert set(dead) == bad | bad_matches
    assert worker.last_run is not None and worker.last_run.clusters == 0  # no edge between two seen images
    state.close()


def hostile_posts(base: str, n: int, seed: int, photos: Sequence[str]) -> Iterator[tuple[bytes | None, bool]]:
    """Posts for the ingest: the valid ones point at the test's photo server."""
    rng = random.Random(seed)
    for i, (raw, ok) in enumerate(mixed("post", n, seed, 900_000)):
        if ok:
            doc = json.loads(raw)
            url = f"{base}/img/{rng.choice(photos)}?n={i}"
            doc["url"] = edge_url(url) if rng.random() < 0.2 else url
            yield json.dumps(doc).encode(), True
        else:
            yield raw, False


@pytest.mark.slow  # loads the embedder in a subprocess: about a minute
def test_ingest_worker_dead_letters_every_hostile_post_and_stores_every_valid_one(
        kafka_broker: Broker, photo_server: PhotoServer, milvus_server: str, tmp_path: Path) -> None:  # noqa: F811
    env = ingest_env(tmp_path, kafka_broker, MEMETRACE_MILVUS_URI=milvus_server, MEMETRACE_INGEST_BATCH_SIZE="32")
    s = settings_from(env)
    ensure_topics(s, [s.kafka_posts_topic, s.kafka_images_topic, s.kafka_deadletter_topic], partitions=1)
    values = list(hostile_posts(photo_server.base, KAFKA_CASES, SEED + 3, sorted(photo_server.jpegs)))
    good, bad = _split(values, send_all(s, s.kafka_posts_topic, [v for v, _ in values]))
    totals = WorkerProcess(env, max_idle=5, name="ingest").finish(timeout=300)  # exit 0: it kept running
    assert totals["stopped_by"] == "max_idle", totals
    counts = milvus_counts(s)
    assert counts["occurrences"] == len({json.loads(v)["post_id"] for v in good}), counts
    dead = dead_letters(s, len(bad))
    assert set(dead) == bad, f"{len(set(dead) ^ bad)} posts neither stored nor dead-lettered"
