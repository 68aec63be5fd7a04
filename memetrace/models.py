"""The domain types every stage shares: images, candidates, matches, posts, dead letters, clusters.

Plain frozen dataclasses, no storage code: the stores (``memetrace.stores``) and the message
contracts (``memetrace.messages``) convert to and from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Match:
    """A verified copy relation between two images (stored with a < b)."""

    a: int
    b: int
    inliers: int  # keypoints the geometric check verified: the match's score
    kind: str  # "full" (same content) or "partial" (one holds a part of the other)


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
