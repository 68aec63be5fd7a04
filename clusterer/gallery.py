"""A static HTML gallery of the clusters: one card per cluster, thumbnails from the feature store.

The page (``index.html``) is self-contained: inline CSS, no scripts, no external URLs. Thumbnails
are copied next to it as ``thumbs/<image id hex>.jpg`` so the folder can be zipped or served as is.
The cards and the page are drawn by :mod:`memetrace.gallery_html`, which the query API's
``/gallery`` page shares (with thumbnails served by the API).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from memetrace.clusterer.export import ClusterRow
from memetrace.feature_store import FeatureStore
from memetrace.gallery_html import render_card, render_page, stat

THUMBS_DIR = "thumbs"


@dataclass(frozen=True)
class Cluster:
    """One cluster as shown: its images in order, each with its file paths."""

    cluster_id: int
    quality: float
    images: dict[int, list[str]]  # image id -> paths, in row order

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_paths(self) -> int:
        return sum(len(p) for p in self.images.values())


def group_clusters(rows: Iterable[ClusterRow]) -> list[Cluster]:
    """Gather rows into clusters, biggest first (images, then paths, then smallest id)."""
    images: dict[int, dict[int, list[str]]] = {}
    quality: dict[int, float] = {}
    for r in rows:
        images.setdefault(r.cluster_id, {}).setdefault(r.image_id, []).append(r.path)
        quality.setdefault(r.cluster_id, r.quality)
    clusters = [Cluster(cid, quality[cid], imgs) for cid, imgs in images.items()]
    clusters.sort(key=lambda c: (-c.n_images, -c.n_paths, c.cluster_id))
    return clusters


def thumb_name(image_id: int) -> str:
    """File name of an image's thumbnail, the same hex spelling as the feature store."""
    return f"{image_id:016x}.jpg"


def copy_thumbnail(features: FeatureStore, image_id: int, thumbs: Path) -> bool:
    """Copy one thumbnail out of the store; False when the store has none."""
    data = features.get_thumbnail(image_id)
    if not data:
        return False
    (thumbs / thumb_name(image_id)).write_bytes(data)
    return True


def render_summary(shown: list[Cluster], eligible: list[Cluster], min_size: int) -> str:
    """The line at the top of the page: clusters shown and images clustered."""
    if not eligible:
        return f'<p class="summary empty">No clusters of {min_size} or more images.</p>'
    images = sum(c.n_images for c in eligible)
    paths = sum(c.n_paths for c in eligible)
    of = f" of {len(eligible)}" if len(shown) < len(eligible) else ""
    return (f'<p class="summary"><b>{len(shown)}</b>{of} clusters shown '
            f'(clusters of {min_size}+ images) · <b>{images}</b> images clustered '
            f'· <b>{paths}</b> paths</p>')


def _card(cluster: Cluster, thumbs_present: set[int], max_thumbs: int) -> str:
    stats = [stat("{} images", cluster.n_images), stat("{} paths", cluster.n_paths),
             stat("quality {}", f"{cluster.quality:.2f}")]
    return render_card(cluster.cluster_id, stats, list(cluster.images.items())[:max_thumbs], cluster.n_images,
                       lambda i: f"{THUMBS_DIR}/{thumb_name(i)}" if i in thumbs_present else None)


def write_gallery(rows: list[ClusterRow], features: FeatureStore, out_dir: Path, min_size: int = 2,
                  max_clusters: int = 500, max_thumbs: int = 48) -> Path:
    """Write ``out_dir/index.html`` and its thumbnails; returns the page's path.

    Shows the ``max_clusters`` biggest clusters of at least ``min_size`` images, each with up to
    ``max_thumbs`` thumbnails; an image without a thumbnail in the store gets a placeholder.
    """
    out_dir = Path(out_dir)
    thumbs = out_dir / THUMBS_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    eligible = [c for c in group_clusters(rows) if c.n_images >= min_size]
    shown = eligible[:max_clusters]
    present: set[int] = set()
    for cluster in shown:
        for image_id in list(cluster.images)[:max_thumbs]:
            if image_id not in present and copy_thumbnail(features, image_id, thumbs):
                present.add(image_id)
    cards = [_card(c, present, max_thumbs) for c in shown]
    page = out_dir / "index.html"
    tmp = page.with_name(f".index.html.{os.getpid()}")
    tmp.write_text(render_page(cards, render_summary(shown, eligible, min_size)), encoding="utf-8")
    os.replace(tmp, page)
    return page
