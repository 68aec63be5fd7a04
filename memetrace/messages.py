"""The Kafka message contracts: every topic's payload, in one place, every field bounded.

``memetrace.posts``       :class:`Post` (JSON, from outside): ``{"post_id", "url", "posted_at"?,
                          "platform"?, "author"?, "meta"?}``; other fields are ignored. Key: any.
``memetrace.images``      :class:`ImageEvent`, one per stored post, key = image id (ingest → matcher,
                          clusterer).
``memetrace.matches``     :class:`MatchEvent`, one per verified copy relation, key ``"a:b"`` (a < b):
                          a pair always lands on one partition (matcher → clusterer).
``memetrace.deadletter``  the message as it came (or, when it is too large for the broker, a bounded
                          prefix), with the reason, source, size and hash in headers (:func:`dead_letter`).

:func:`parse` is the one way a consumer reads a message: whatever is wrong with it (not JSON,
nested too deep, too large, a field out of range, an unknown schema version) becomes an
:class:`InvalidMessage`, which the consume loop dead-letters; nothing else escapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from memetrace.models import Geometry, Match
from memetrace.varchar import json_text

SCHEMA_VERSION = 1
MAX_ID = 2**63 - 1  # Milvus and SQLite keys are signed 64-bit
ImageId = Annotated[int, Field(ge=0, le=MAX_ID, strict=True)]
MAX_MESSAGE_BYTES = 1_000_000  # the broker's default max.message.bytes; larger values are refused unread
MAX_DEPTH = 32  # JSON nesting: a post is two levels deep; deeper is hostile (json recurses per level)
MAX_DETAIL = 1024
# identifiers are bounded in UTF-8 bytes, as the stores hold them (memetrace.varchar): a post id is
# a key, never cut (two posts would merge), a URL cut would not name the image; the author is free
# text, bounded in characters and cut to AUTHOR_BYTES by the stores
POST_ID_BYTES = 1024
URL_BYTES = 4096
PLATFORM_BYTES = 64
AUTHOR_BYTES = 256
# a post's meta: a flat mapping of text, kept whole by every store (the occurrence log holds its
# JSON text, memetrace.varchar.json_text, in a META_BYTES VARCHAR)
MAX_META_KEYS = 32
META_KEY_BYTES = 64
META_VALUE_BYTES = 1024
META_BYTES = 4096

#: dead-letter header names (values are UTF-8)
H_REASON = "memetrace-reason"
H_DETAIL = "memetrace-detail"
H_SOURCE = "memetrace-source"
H_POST_ID = "memetrace-post-id"
H_SIZE = "memetrace-original-bytes"
H_SHA256 = "memetrace-original-sha256"
H_TRUNCATED = "memetrace-truncated"


class InvalidMessage(Exception):
    """A message that is not what its topic carries; ``reason`` is a short code for the dead letter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:MAX_DETAIL]


def _at_most_bytes(max_bytes: int) -> AfterValidator:
    def check(v: str) -> str:
        if (n := len(v.encode("utf-8"))) > max_bytes:
            raise ValueError(f"at most {max_bytes} UTF-8 bytes, got {n}")
        return v

    return AfterValidator(check)


# max_length (characters) first: a cheap bound the bytes one implies
PostId = Annotated[str, Field(min_length=1, max_length=POST_ID_BYTES), _at_most_bytes(POST_ID_BYTES)]
Url = Annotated[str, Field(min_length=1, max_length=URL_BYTES), _at_most_bytes(URL_BYTES)]
Platform = Annotated[str, Field(max_length=PLATFORM_BYTES), _at_most_bytes(PLATFORM_BYTES)]
MetaKey = Annotated[str, Field(min_length=1, max_length=META_KEY_BYTES), _at_most_bytes(META_KEY_BYTES)]
MetaValue = Annotated[str, Field(max_length=META_VALUE_BYTES), _at_most_bytes(META_VALUE_BYTES)]


def _meta_fits(meta: dict[str, str]) -> dict[str, str]:
    if (n := len(json_text(meta).encode("utf-8"))) > META_BYTES:
        raise ValueError(f"at most {META_BYTES} bytes of JSON, got {n}")
    return meta


Meta = Annotated[dict[MetaKey, MetaValue], Field(max_length=MAX_META_KEYS), AfterValidator(_meta_fits)]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, allow_inf_nan=False)

    v: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION, description="schema version of the message")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class Post(_Contract):
    """One social-media post pointing at an image (what the outside world sends)."""

    post_id: PostId
    url: Url
    posted_at: datetime | None = None
    platform: Platform = ""
    author: str = Field("", max_length=AUTHOR_BYTES)
    meta: Meta = Field(default_factory=dict, description=f"flat text about the post (likes, caption, ...): at most "
                       f"{MAX_META_KEYS} keys of {META_KEY_BYTES} bytes, values of {META_VALUE_BYTES}, "
                       f"{META_BYTES} bytes of JSON in all")

    @field_validator("post_id", mode="before")
    @classmethod
    def _id_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_ID else v

    @field_validator("meta", mode="before")
    @classmethod
    def _scalars_as_text(cls, v: Any) -> Any:
        # a number or boolean is kept as its JSON text ({"likes": 3} -> "3"); nested values are refused
        if not isinstance(v, dict):
            return v
        return {k: json.dumps(x) if isinstance(x, bool | int) or (isinstance(x, float) and math.isfinite(x)) else x
                for k, x in v.items()}

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"url must be an http(s) URL with a host, got {v[:200]!r}")
        return v

    @field_validator("posted_at")
    @classmethod
    def _representable(cls, v: datetime | None) -> datetime | None:
        # raises (OverflowError -> invalid) if not representable; before 1970 it would not fit
        # PostRef.posted_at (-1 = unknown), and no social post is that old
        if v is not None and _unix(v) < 0:
            raise ValueError(f"posted_at {v.isoformat()} is before 1970-01-01T00:00:00Z; omit it when unknown")
        return v

    def posted_at_unix(self) -> int:
        """Seconds since the epoch, -1 when unknown (naive times are taken as UTC)."""
        return -1 if self.posted_at is None else _unix(self.posted_at)


def _unix(ts: datetime) -> int:
    return int(ts.replace(tzinfo=ts.tzinfo or timezone.utc).timestamp())


class PostRef(_Contract):
    """What the clusterer keeps of a post: its id, time and platform."""

    post_id: PostId
    posted_at: int = Field(-1, ge=-1, le=2**62, description="unix seconds, -1 = unknown")
    platform: Platform = ""


class ImageEvent(_Contract):
    """Published on ``memetrace.images`` once the image and its post are stored."""

    image_id: ImageId
    nb_points: int = Field(ge=0, le=1_000_000, strict=True, description="keypoints stored for the image")
    post: PostRef


_Px = Annotated[int, Field(ge=0, le=1_000_000)]
_Cover = Annotated[float, Field(ge=-1.0, le=1.0)]


class GeometryEvent(BaseModel):
    """Where the two images of a match share content, a -> b (memetrace.models.Geometry)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    box_a: tuple[_Px, _Px, _Px, _Px]
    box_b: tuple[_Px, _Px, _Px, _Px]
    scale: float = Field(gt=0.0, le=1000.0)
    rotation: float = Field(ge=-180.0, le=180.0)
    mirrored: bool
    inliers: int = Field(ge=0, le=1_000_000)
    cover_a: _Cover = -1.0
    cover_b: _Cover = -1.0
    size_a: tuple[_Px, _Px] = (0, 0)
    size_b: tuple[_Px, _Px] = (0, 0)


class MatchEvent(_Contract):
    """A verified copy relation; ``a`` < ``b``, never a self-loop."""

    a: ImageId = Field(description="the smaller image id")
    b: ImageId
    inliers: int = Field(ge=0, le=1_000_000, strict=True, description="keypoints verified by the geometric check")
    kind: Literal["full", "partial"] = Field(description="full (same content) or partial (one holds a part of the other)")
    geometry: GeometryEvent | None = Field(None, description="shared region and transform a -> b; absent = unknown")

    @field_validator("b")
    @classmethod
    def _ordered(cls, b: int, info: Any) -> int:
        a = info.data.get("a")
        if a is not None and not a < b:
            raise ValueError(f"a < b is required (a={a}, b={b}): edges are stored once per pair, no self-loops")
        return b

    @classmethod
    def of(cls, m: Match) -> MatchEvent:
        geo = m.geometry if m.geometry is None or m.a < m.b else m.geometry.swapped()
        return cls(a=min(m.a, m.b), b=max(m.a, m.b), inliers=m.inliers, kind=m.kind,
                   geometry=None if geo is None else GeometryEvent(**geo.to_dict()))

    def to_match(self) -> Match:
        geo = None if self.geometry is None else Geometry.from_dict(self.geometry.model_dump())
        return Match(self.a, self.b, self.inliers, self.kind, geo)

    def key(self) -> bytes:
        return f"{self.a}:{self.b}".encode()


M = TypeVar("M", bound=_Contract)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


def json_depth(raw: bytes) -> int:
    """Deepest nesting of brackets outside strings, counted without parsing (numpy, linear time)."""
    arr = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    steps = np.isin(arr, _OPEN).astype(np.int32) - np.isin(arr, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def parse(model: type[M], raw: bytes | None, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Validate one message value as ``model``, or raise :class:`InvalidMessage` saying what to fix."""
    name = model.__name__
    if raw is None:
        raise InvalidMessage("invalid_json", f"empty message value (tombstone); send a JSON {name}")
    if len(raw) > max_bytes:
        raise InvalidMessage("too_large", f"{len(raw)} bytes, over {max_bytes}: a {name} is a few hundred bytes")
    if (depth := json_depth(raw)) > MAX_DEPTH:
        raise InvalidMessage("too_deep", f"JSON nested {depth} levels deep, over {MAX_DEPTH}; send a flat {name}")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidMessage("invalid_json", f"not JSON ({str(exc)[:200]}); send a JSON {name}") from exc
    if not isinstance(doc, dict):
        raise InvalidMessage(f"invalid_{_snake(name)}", f"expected a JSON object ({name}), got {type(doc).__name__}")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in exc.errors())
        raise InvalidMessage(f"invalid_{_snake(name)}", errors) from exc
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # raised by a validator itself
        raise InvalidMessage(f"invalid_{_snake(name)}", f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# ----------------------------------------------------------------------------- keys and dead letters


def stable_key(text: str) -> int:
    """Positive int64 from a string: the primary key of a post or of a message position."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") & MAX_ID


def occurrence_key(post_id: str) -> int:
    return stable_key(f"post:{post_id}")


def source_of(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def deadletter_key(source: str) -> int:
    return stable_key(f"msg:{source}")


def dead_letter(value: bytes | None, reason: str, detail: str, source: str, post_id: str = "",
                max_bytes: int = MAX_MESSAGE_BYTES // 2) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The dead letter of a message: its value (a prefix of ``max_bytes`` when larger: the broker
    would refuse the whole) and headers naming the reason, source, original size and hash."""
    value = value or b""
    headers = [(H_REASON, reason[:64]), (H_DETAIL, detail[:MAX_DETAIL]), (H_SOURCE, source[:512]),
               (H_SIZE, str(len(value))), (H_SHA256, hashlib.sha256(value).hexdigest())]
    if post_id:
        headers.append((H_POST_ID, post_id[:1024]))
    if len(value) > max_bytes:
        headers.append((H_TRUNCATED, "1"))
        value = value[:max_bytes]
    return value, [(k, v.encode("utf-8", "replace")) for k, v in headers]
