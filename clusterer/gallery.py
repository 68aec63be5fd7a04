"""A static HTML gallery of the clusters: one card per cluster, thumbnails from the feature store.

The page (``index.html``) is self-contained: inline CSS, no scripts, no external URLs. Thumbnails
are copied next to it as ``thumbs/<image id hex>.jpg`` so the folder can be zipped or served as is;
each thumbnail links to its file (a path relative to the page, or the URL it came from). The
earliest copy of a cluster is found by its earliest post in the occurrence log, else its file's
modification time. The cards and the page are drawn by :mod:`memetrace.gallery_html`, which the
query API's ``/gallery`` page shares (with thumbnails served by the API).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memetrace.clusterer.export import ClusterRow
from memetrace.feature_store import FeatureStore
from memetrace.gallery_html import (STATIC_SEARCH_NOTE, Card, Cell, SectionHook, card_sections, earliest_first,
                                    first_seen, is_url, render_card, render_page, stat)
from memetrace.occurrence_log import OccurrenceLog

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


def render_summary(shown: list[Cluster], eligible: list[Cluster], min_size: int, unclustered: int) -> str:
    """The line at the top of the page: clusters shown, images clustered, images in no cluster."""
    alone = f" · <b>{unclustered}</b> images in no cluster" if unclustered else ""
    if not eligible:
        return f'<p class="summary empty">No clusters of {min_size} or more images{alone}.</p>'
    images = sum(c.n_images for c in eligible)
    paths = sum(c.n_paths for c in eligible)
    of = f" of {len(eligible)}" if len(shown) < len(eligible) else ""
    return (f'<p class="summary"><b>{len(shown)}</b>{of} clusters shown '
            f'(clusters of {min_size}+ images) · <b>{images}</b> images clustered '
            f'· <b>{paths}</b> paths{alone}</p>')


def full_link(path: str, root: Path | None, page_dir: Path) -> str:
    """Where a thumbnail links: a URL as is, a file relative to the page's folder."""
    if is_url(path):
        return path
    target = Path(os.path.abspath((root or Path.cwd()) / path))
    return urllib.parse.quote(os.path.relpath(target, os.path.abspath(page_dir)))


def _card(cluster: Cluster, ids: list[int], first: int | None, thumbs_present: set[int], links: dict[int, str],
          times: dict[int, int], hooks: Sequence[SectionHook]) -> Card:
    stats = [stat("{} images", cluster.n_images), stat("{} paths", cluster.n_paths),
             stat("quality {}", f"{cluster.quality:.2f}")]
    cells = [Cell(i, cluster.images[i], f"{THUMBS_DIR}/{thumb_name(i)}" if i in thumbs_present else None,
                  links.get(i), i == first, times.get(i, -1)) for i in ids]
    return Card(cluster.cluster_id, stats, cells, cluster.n_images, card_sections(hooks, cluster.cluster_id, ids))


def write_gallery(rows: list[ClusterRow], features: FeatureStore, out_dir: Path, min_size: int = 2,
                  max_clusters: int = 500, max_thumbs: int = 48, root: Path | None = None,
                  log: OccurrenceLog | None = None, hooks: Sequence[SectionHook] = ()) -> Path:
    """Write ``out_dir/index.html`` and its thumbnails; returns the page's path.

    Shows the ``max_clusters`` biggest clusters of at least ``min_size`` images, each with up to
    ``max_thumbs`` thumbnails (the earliest copy first); an image without a thumbnail in the store
    gets a placeholder. ``root``: the folder the rows' relative paths are in (default: the working
    directory); ``log``: the posts that date the copies; ``hooks``: extra sections per card.
    """
    out_dir = Path(out_dir)
    thumbs = out_dir / THUMBS_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    clusters = group_clusters(rows)
    eligible = [c for c in clusters if c.n_images >= min_size]
    unclustered = sum(c.n_images for c in clusters if c.n_images < min_size)
    shown = eligible[:max_clusters]
    ids = [i for c in shown for i in c.images]
    files = {i: [str((root or Path()) / p) for p in paths] for c in shown for i, paths in c.images.items()}
    times = first_seen(log.occurrences_of(ids) if log is not None and ids else [], files)
    links = {i: full_link(paths[0], root, out_dir) for c in shown for i, paths in c.images.items()}
    orders = [earliest_first(list(c.images), times) for c in shown]
    present: set[int] = set()
    for ids, _ in orders:
        for image_id in ids[:max_thumbs]:
            if image_id not in present and copy_thumbnail(features, image_id, thumbs):
                present.add(image_id)
    cards = [_card(c, ids[:max_thumbs], first, present, links, times, hooks) for c, (ids, first) in zip(shown, orders)]
    page = out_dir / "index.html"
    tmp = page.with_name(f".index.html.{os.getpid()}")
    summary = render_summary(shown, eligible, min_size, unclustered)
    tmp.write_text(render_page([render_card(c) for c in cards], summary, STATIC_SEARCH_NOTE), encoding="utf-8")
    os.replace(tmp, page)
    return page
