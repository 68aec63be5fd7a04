"""The domain types every stage shares: images, candidates, matches, posts, dead letters, clusters.

Plain frozen dataclasses, no storage code: the stores (``memetrace.stores``) and the message
contracts (``memetrace.messages``) convert to and from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in an image's pixels (x1, y1 excluded)


@dataclass(frozen=True)
class Geometry:
    """Where two verified images share content, read from the verification's RANSAC model (a -> b).

    Boxes are in the pixels of each image's file (not of the SIFT working size)."""

    box_a: Box  # the shared region in a
    box_b: Box  # the same region in b
    scale: float  # size in b / size in a of the shared content (< 1: b shows it smaller)
    rotation: float  # degrees, counter-clockwise on screen, a -> b, in (-180, 180]
    mirrored: bool  # b shows a mirrored (left-right)
    inliers: int
    cover_a: float = -1.0  # share of a's keypoints near a verified point (1: all of a is in b); -1 unknown
    cover_b: float = -1.0
    size_a: tuple[int, int] = (0, 0)  # width, height of a's file; (0, 0) unknown
    size_b: tuple[int, int] = (0, 0)

    def swapped(self) -> Geometry:
        """The same relation seen from b (b -> a)."""
        # a mirror reverses the turn's direction: undoing "mirror then turn by r" is a turn by r then a mirror
        rotation = self.rotation if self.mirrored else (-self.rotation if self.rotation != 180.0 else 180.0)
        return Geometry(self.box_b, self.box_a, round(1.0 / self.scale, 4), rotation, self.mirrored, self.inliers,
                        self.cover_b, self.cover_a, self.size_b, self.size_a)

    def to_dict(self) -> dict:
        return {"box_a": list(self.box_a), "box_b": list(self.box_b), "scale": self.scale,
                "rotation": self.rotation, "mirrored": self.mirrored, "inliers": self.inliers,
                "cover_a": self.cover_a, "cover_b": self.cover_b, "size_a": list(self.size_a),
                "size_b": list(self.size_b)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        def ints(key: str, default: list[int]) -> tuple:
            return tuple(int(v) for v in d.get(key, default))

        return cls(ints("box_a", []), ints("box_b", []), float(d["scale"]), float(d["rotation"]),  # type: ignore[arg-type]
                   bool(d["mirrored"]), int(d["inliers"]), float(d.get("cover_a", -1.0)),
                   float(d.get("cover_b", -1.0)), ints("size_a", [0, 0]), ints("size_b", [0, 0]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Match:
    """A verified copy relation between two images (stored with a < b)."""

    a: int
    b: int
    inliers: int  # keypoints the geometric check verified: the match's score
    kind: str  # "full" (same content) or "partial" (one holds a part of the other)
    geometry: Geometry | None = None  # a -> b; None where not known (edges stored before it was kept)


@dataclass(frozen=True)
class Derivation:
    """One member's estimated parent (None: a root), the edit that made it, and a confidence in [0, 1]."""

    image_id: int
    parent: int | None
    edit: str  # memetrace.clusterer.tree.EDITS; "" for a root
    confidence: float


@dataclass(frozen=True)
class ImageRecord:
    """What the vector index says of a stored image (:meth:`~memetrace.vector_index.VectorIndex.get`): no vectors."""

    image_id: int
    path: str
    width: int
    height: int
    nbytes: int
    nb_points: int


@dataclass(frozen=True)
class ImageRow(ImageRecord):
    """An image as the ingest stores it: its record and its descriptors."""

    vector: np.ndarray  # global descriptor
    regions: np.ndarray  # R x D regional descriptors (R may be 0)


@dataclass(frozen=True)
class Candidate:
    image_id: int
    similarity: float


@dataclass(frozen=True)
class OccurrenceRow:
    """One post showing one image; ``id`` = :func:`memetrace.messages.occurrence_key` of the post id."""

    id: int
    image_id: int
    post_id: str
    url: str
    posted_at: int  # unix seconds, -1 = unknown
    platform: str
    author: str
    seen_at: int = -1  # unix seconds the log stored it: set by the log (read back), ignored when written
    # the post's other fields (Post.meta, a posts CSV's extra columns), cut as the stores keep them
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ClusterSummary:
    """What the clusterer publishes per cluster of 2+ images (times: unix seconds)."""

    cluster_id: int
    images: int
    posts: int  # occurrences: posts (streaming) and files (batch) showing one of its images
    first_seen: int
    last_seen: int
    growth_hour: int  # posts in the hour before the run (by posting time, else when first seen)
    growth_day: int
    platforms: dict[str, int]  # posts per platform ("file" for indexed files)
    history: list[dict]  # latest events: {"at", "event": created|grew|shrank|merged|split, "clusters": [...]}
    updated_at: int

    def growth_rank(self) -> tuple[int, int, int, int]:
        """Sort key, fastest-growing first: posts in the last hour, then day, then all posts."""
        return -self.growth_hour, -self.growth_day, -self.posts, self.cluster_id


@dataclass(frozen=True)
class DeadLetterRow:
    """One message the ingest could not store; ``id`` hashes its topic/partition/offset."""

    id: int
    reason: str
    detail: str
    post_id: str
    url: str
    source: str  # "topic/partition/offset"
