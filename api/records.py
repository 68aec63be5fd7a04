"""What the stores hold, as the API's response models: images, their posts, cluster orders."""

from __future__ import annotations

from collections.abc import Callable

from memetrace.api.schemas import Post, Sort, StoredImage
from memetrace.models import ClusterSummary, ImageRecord, OccurrenceRow
from memetrace.occurrence_log import OccurrenceLog

_ORDERS: dict[str, Callable[[ClusterSummary], tuple]] = {
    "size": lambda c: (-c.images, -c.posts, c.cluster_id),
    "growth": ClusterSummary.growth_rank,
    "recent": lambda c: (-c.last_seen, -c.images, c.cluster_id),
}


def sorted_summaries(summaries: list[ClusterSummary], sort: Sort) -> list[ClusterSummary]:
    """size: most images first; growth: most posts in the last hour (then day); recent: last seen."""
    return sorted(summaries, key=_ORDERS[sort])


def _post_time(row: OccurrenceRow) -> int:
    return row.posted_at if row.posted_at >= 0 else row.seen_at


def posts_of(log: OccurrenceLog, image_ids: list[int]) -> list[Post]:
    """Every post of these images, oldest first (by post time, else when it was ingested)."""
    rows = sorted(log.occurrences_of(image_ids), key=lambda r: (_post_time(r), r.image_id, r.post_id))
    return [post_of(r) for r in rows]


def post_of(row: OccurrenceRow) -> Post:
    return Post(image_id=row.image_id, post_id=row.post_id, url=row.url, platform=row.platform,
                posted_at=row.posted_at, meta=dict(row.meta))


def stored_image(row: ImageRecord, cluster_id: int | None, thumbnail: str) -> StoredImage:
    """A stored image with its cluster and thumbnail URL."""
    return StoredImage(image_id=row.image_id, path=row.path, width=row.width, height=row.height, nbytes=row.nbytes,
                       nb_points=row.nb_points, cluster_id=cluster_id, thumbnail=thumbnail)
