"""What Milvus stores, as the API's JSON records: images, their posts, cluster summaries and orders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

from memetrace.milvus_store import MilvusStore
from memetrace.models import ClusterSummary

Sort = Literal["size", "growth", "recent"]

_ORDERS: dict[str, Callable[[ClusterSummary], tuple]] = {
    "size": lambda c: (-c.images, -c.posts, c.cluster_id),
    "growth": ClusterSummary.growth_rank,
    "recent": lambda c: (-c.last_seen, -c.images, c.cluster_id),
}


def sorted_summaries(summaries: list[ClusterSummary], sort: Sort) -> list[ClusterSummary]:
    """size: most images first; growth: most posts in the last hour (then day); recent: last seen."""
    return sorted(summaries, key=_ORDERS[sort])


def summary_record(c: ClusterSummary) -> dict[str, Any]:
    """A cluster summary without its history (listed separately, by the cluster's own endpoint)."""
    record = asdict(c)
    del record["history"]
    return record


def _post_time(row: dict) -> int:
    return int(row["posted_at"]) if int(row["posted_at"]) >= 0 else int(row["seen_at"])


def posts_of(store: MilvusStore, image_ids: list[int]) -> list[dict[str, Any]]:
    """Every post of these images, oldest first (by post time, else when it was ingested)."""
    rows = sorted(store.occurrences_of(image_ids), key=lambda r: (_post_time(r), int(r["image_id"]), r["post_id"]))
    return [{"image_id": int(r["image_id"]), "post_id": r["post_id"], "url": r["url"], "platform": r["platform"],
             "posted_at": int(r["posted_at"])} for r in rows]


def image_record(row: dict, cluster_id: int | None, thumbnail: str) -> dict[str, Any]:
    """A stored image (a :meth:`MilvusStore.get` row) with its cluster and thumbnail URL."""
    return {"image_id": int(row["id"]), "path": row["path"], "width": int(row["width"]),
            "height": int(row["height"]), "nbytes": int(row["nbytes"]), "nb_points": int(row["nb_points"]),
            "cluster_id": cluster_id, "thumbnail": thumbnail}
