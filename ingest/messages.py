"""The Kafka message contract of the streaming ingest.

``memetrace.posts`` (in)        JSON :class:`Post`: ``{"post_id", "url", "posted_at"?, "platform"?,
                                "author"?, "text"?, "meta"?}``; key: the post id (any key works).
``memetrace.images`` (out)      JSON :class:`ImageEvent`, one per stored post, key = image id: what
                                the matcher needs to find copies of the image.
``memetrace.deadletter`` (out)  the *original* message bytes, unchanged, with the reason in headers
                                (:func:`deadletter_headers`): a consumer can fix and replay them as-is.

Every id written to Milvus derives from the message content (post id, image bytes) or its
coordinates (topic/partition/offset), so a redelivered message rewrites the same rows.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: dead-letter header names (values are UTF-8)
H_REASON = "memetrace-reason"
H_DETAIL = "memetrace-detail"
H_SOURCE = "memetrace-source"
H_POST_ID = "memetrace-post-id"


class Post(BaseModel):
    """One social-media post pointing at an image."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    post_id: str = Field(min_length=1, max_length=1024)
    url: str = Field(min_length=1, max_length=4096)
    posted_at: datetime | None = None
    platform: str = Field("", max_length=64)
    author: str = Field("", max_length=256)
    text: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("post_id", mode="before")
    @classmethod
    def _id_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http(s) URL with a host, got {v[:200]!r}")
        return v

    def posted_at_unix(self) -> int:
        """Seconds since the epoch, -1 when unknown (naive times are taken as UTC)."""
        if self.posted_at is None:
            return -1
        ts = self.posted_at
        return int(ts.timestamp()) if ts.tzinfo else int(ts.replace(tzinfo=timezone.utc).timestamp())


class InvalidMessage(Exception):
    """A posts-topic message that is not a :class:`Post`; ``reason``: invalid_json | invalid_post."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_post(raw: bytes | None) -> Post:
    """Validate one message value, or raise :class:`InvalidMessage` saying what to fix."""
    if raw is None:
        raise InvalidMessage("invalid_json", "empty message value (tombstone); send a JSON post")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage("invalid_json", f"not JSON ({exc}); send {{\"post_id\": ..., \"url\": ...}}") from exc
    if not isinstance(doc, dict):
        raise InvalidMessage("invalid_post", f"expected a JSON object, got {type(doc).__name__}")
    try:
        return Post.model_validate(doc)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'post'}: {e['msg']}" for e in exc.errors())
        raise InvalidMessage("invalid_post", errors) from exc


def stable_key(text: str) -> int:
    """Positive int64 from a string: the Milvus primary key of a post or a message position."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") & 0x7FFF_FFFF_FFFF_FFFF


def occurrence_key(post_id: str) -> int:
    return stable_key(f"post:{post_id}")


def source_of(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def deadletter_key(source: str) -> int:
    return stable_key(f"msg:{source}")


def deadletter_headers(reason: str, detail: str, source: str, post_id: str = "") -> list[tuple[str, bytes]]:
    headers = [(H_REASON, reason), (H_DETAIL, detail[:1024]), (H_SOURCE, source)]
    if post_id:
        headers.append((H_POST_ID, post_id))
    return [(k, v.encode("utf-8")) for k, v in headers]


class FeaturePaths(BaseModel):
    """Feature-store keys of one image (relative to the store's root or bucket)."""

    keypoints: str
    thumbnail: str


class ImageEvent(BaseModel):
    """Published on ``memetrace.images`` once the image and the occurrence are stored."""

    image_id: int
    new_image: bool = Field(description="first time this worker's batch stored the image (matcher: match it)")
    width: int
    height: int
    nbytes: int
    nb_points: int
    features: FeaturePaths
    post: Post

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")
