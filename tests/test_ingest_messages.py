"""The ingest message contract, producer line parsing, fetch settings and metrics (no services)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from memetrace.fetch import FetchPolicy
from memetrace.messages import (H_REASON, H_SOURCE, MAX_MESSAGE_BYTES, MAX_META_KEYS, META_KEY_BYTES,
                                META_VALUE_BYTES, ImageEvent, InvalidMessage, Post, PostRef, dead_letter,
                                deadletter_key, occurrence_key, parse, source_of)
from memetrace.ingest.producer import lines_to_messages
from kafka_broker import free_port
from memetrace.ingest.metrics import IngestMetrics
from memetrace.metrics import serve
from memetrace.settings import Settings


def test_valid_post_keeps_the_fields_memetrace_reads() -> None:
    post = parse(Post, json.dumps({"post_id": 42, "url": "https://example.org/a.jpg",
                                   "posted_at": "2024-05-01T10:00:00Z", "platform": "mastodon", "author": "ana",
                                   "text": "lol", "meta": {"likes": 3}, "unknown": "ignored"}).encode())
    assert post.post_id == "42" and post.platform == "mastodon" and post.author == "ana"
    assert set(post.model_dump()) == {"v", "post_id", "url", "posted_at", "platform", "author", "meta"}  # the rest: unread
    assert post.posted_at_unix() == 1714557600 and post.meta == {"likes": "3"}
    bare = parse(Post, b'{"post_id": "a", "url": "http://h/x"}')  # as producers sent before meta was read
    assert bare.posted_at_unix() == -1 and bare.meta == {}


def test_meta_is_flat_text_within_its_bounds() -> None:
    post = parse(Post, _post(meta={" likes ": 3, "ratio": 0.5, "nsfw": False, "caption": " 日本 ", "lang": ""}))
    assert post.meta == {"likes": "3", "ratio": "0.5", "nsfw": "false", "caption": "日本", "lang": ""}
    edge = {f"k{i:02d}": "é" * 50 for i in range(MAX_META_KEYS)}  # 32 keys, 3,8xx bytes of JSON
    assert parse(Post, _post(meta=edge)).meta == edge
    assert parse(Post, _post(meta={"k" * META_KEY_BYTES: "v" * META_VALUE_BYTES})).meta


@pytest.mark.parametrize(("meta", "hint"), [
    ({f"k{i}": "v" for i in range(MAX_META_KEYS + 1)}, "meta: Dictionary should have at most 32 items"),
    ({"k": "v" * (META_VALUE_BYTES + 1)}, "meta.k: String should have at most 1024 characters"),
    ({"k": "é" * (META_VALUE_BYTES // 2 + 1)}, "meta.k: Value error, at most 1024 UTF-8 bytes"),
    ({"k" * (META_KEY_BYTES + 1): "v"}, "String should have at most 64 characters"),
    ({f"k{i}": "v" * 1000 for i in range(5)}, "meta: Value error, at most 4096 bytes of JSON"),
    ({"": "v"}, "String should have at least 1 character"),
    ({"k": {"nested": "v"}}, "meta.k: Input should be a valid string"),
    ({"k": ["v"]}, "meta.k: Input should be a valid string"),
    ({"k": None}, "meta.k: Input should be a valid string"),
    ("likes=3", "meta: Input should be a valid dictionary"),
])
def test_meta_over_its_bounds_is_an_invalid_post(meta: object, hint: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(Post, _post(meta=meta))
    detail = info.value.detail
    assert info.value.reason == "invalid_post" and detail.startswith("meta") and hint in detail, detail


def _post(**fields: object) -> bytes:
    return json.dumps({"post_id": "p", "url": "https://example.org/a.jpg"} | fields, ensure_ascii=False).encode()


@pytest.mark.parametrize(("raw", "reason", "hint"), [
    (b"not json", "invalid_json", "not JSON"),
    (None, "invalid_json", "tombstone"),
    (b"\xff\xfe", "invalid_json", "not JSON"),
    (b"[1, 2]", "invalid_post", "JSON object"),
    (b'{"post_id": "a"}', "invalid_post", "url"),
    (b'{"url": "http://h/x"}', "invalid_post", "post_id"),
    (b'{"post_id": "", "url": "http://h/x"}', "invalid_post", "post_id"),
    (b'{"post_id": "a", "url": "ftp://h/x"}', "invalid_post", "http(s)"),
    (b'{"post_id": "a", "url": "file:///etc/passwd"}', "invalid_post", "http(s)"),
    (b'{"post_id": "a", "url": "http://h/x", "posted_at": "yesterday"}', "invalid_post", "posted_at"),
])
def test_invalid_messages_name_the_reason(raw: bytes | None, reason: str, hint: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(Post, raw)
    assert info.value.reason == reason
    assert hint in info.value.detail


def test_a_post_with_a_huge_text_gives_a_small_image_event_and_a_larger_one_is_refused_unread() -> None:
    """A post's text is read by no stage, its meta by the ingest alone: neither reaches the images
    topic, whose events would otherwise exceed the broker's message size and be retried for ever."""
    big = {"post_id": "p", "url": "https://example.org/a.jpg", "text": "x" * 900_000, "meta": {"k": "v" * 1000}}
    post = parse(Post, json.dumps(big).encode())
    event = ImageEvent(image_id=1, nb_points=10, post=PostRef(post_id=post.post_id, posted_at=post.posted_at_unix(),
                                                              platform=post.platform))
    assert len(event.to_bytes()) < 200
    with pytest.raises(InvalidMessage) as info:
        parse(Post, json.dumps({**big, "text": "x" * (MAX_MESSAGE_BYTES + 1)}).encode())
    assert info.value.reason == "too_large"


def test_keys_are_stable_positive_int64() -> None:
    assert occurrence_key("p1") == occurrence_key("p1") != occurrence_key("p2")
    src = source_of("memetrace.posts", 1, 7)
    assert src == "memetrace.posts/1/7"
    for key in (occurrence_key("p1"), deadletter_key(src)):
        assert 0 <= key < 2**63
    value, headers = dead_letter(b"{}", "http_404", "gone", src, "p1")
    assert value == b"{}" and dict(headers)[H_REASON] == b"http_404" and dict(headers)[H_SOURCE] == src.encode()


def test_producer_lines(tmp_path: Path) -> None:
    f = tmp_path / "posts.txt"
    f.write_text('# comment\n\nhttp://h/a.jpg\n{"post_id": "x", "url": "http://h/b.jpg"}\n{broken\n')
    msgs = list(lines_to_messages(f))
    assert msgs[0] == (b"posts.txt:3", json.dumps({"post_id": "posts.txt:3", "url": "http://h/a.jpg"}).encode())
    assert msgs[1] == (b"x", b'{"post_id": "x", "url": "http://h/b.jpg"}')
    assert msgs[2] == (b"posts.txt:5", b"{broken")  # sent as-is: the worker dead-letters it


def test_fetch_settings_map_to_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMETRACE_FETCH_ALLOW_PRIVATE_NETWORKS", "1")
    monkeypatch.setenv("MEMETRACE_FETCH_TRUSTED_NETWORKS", '["10.1.0.0/16"]')
    monkeypatch.setenv("MEMETRACE_FETCH_RETRIES", "0")
    policy = FetchPolicy.from_settings(Settings(_env_file=None))
    assert policy.allow_private_networks and policy.trusted_networks == ("10.1.0.0/16",) and policy.retries == 0
    assert FetchPolicy.from_settings(Settings(_env_file=None, fetch_allow_private_networks=False)).allow_private_networks is False


def test_metrics_on_a_fresh_registry_are_served() -> None:
    registry = CollectorRegistry()
    m = IngestMetrics(registry)
    m.posts_consumed.inc(3)
    m.download_failures.labels("http_404").inc()
    m.download_seconds.observe(0.2)
    m.consumer_lag.labels("memetrace.posts", "0").set(5)
    IngestMetrics(CollectorRegistry())  # a second registry: no duplicate-name clash
    assert serve(registry, 0) is None
    port = free_port()
    server = serve(registry, port, "127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    for line in ("memetrace_posts_consumed_total 3.0", 'memetrace_download_failures_total{reason="http_404"} 1.0',
                 "memetrace_download_seconds_count 1.0",
                 'memetrace_consumer_lag{partition="0",topic="memetrace.posts"} 5.0'):
        assert line in body
