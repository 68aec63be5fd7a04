"""What the stores hold, as the API's response models: images, their posts, cluster orders."""

from __future__ import annotations

from collections.abc import Callable

from memetrace.api.schemas import Post, Sort, StoredImage
from memetrace.models import ClusterSummary
from memetrace.occurrence_log import OccurrenceLog

_ORDERS: dict[str, Callable[[ClusterSummary], tuple]] = {
    "size": lambda c: (-c.images, -c.posts, c.cluster_id),
    "growth": ClusterSummary.growth_rank,
    "recent": lambda c: (-c.last_seen, -c.images, c.cluster_id),
}


def sorted_summaries(summaries: list[ClusterSummary], sort: Sort) -> list[ClusterSummary]:
    """size: most images first; growth: most posts in the last hour (then day); recent: last seen."""
    return sorted(summaries, key=_ORDERS[sort])


def _post_time(row: dict) -> int:
    return int(row["posted_at"]) if int(row["posted_at"]) >= 0 else int(row["seen_at"])


def posts_of(log: OccurrenceLog, image_ids: list[int]) -> list[Post]:
    """Every post of these images, oldest first (by post time, else when it was ingested)."""
    rows = sorted(log.occurrences_of(image_ids), key=lambda r: (_post_time(r), int(r["image_id"]), r["post_id"]))
    return [Post(image_id=int(r["image_id"]), post_id=r["post_id"], url=r["url"], platform=r["platform"],
                 posted_at=int(r["posted_at"])) for r in rows]


def stored_image(row: dict, cluster_id: int | None, thumbnail: str) -> StoredImage:
    """A stored image (a :meth:`~memetrace.vector_index.VectorIndex.get` row) with its cluster and thumbnail URL."""
    return StoredImage(image_id=int(row["id"]), path=row["path"], width=int(row["width"]),
                       height=int(row["height"]), nbytes=int(row["nbytes"]), nb_points=int(row["nb_points"]),
                       cluster_id=cluster_id, thumbnail=thumbnail)
