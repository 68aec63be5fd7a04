"""A static HTML gallery of the clusters: one card per cluster, thumbnails from the feature store.

The page (``index.html``) is self-contained: inline CSS, no scripts, no external URLs. Thumbnails
are copied next to it as ``thumbs/<image id hex>.jpg`` so the folder can be zipped or served as is.
The query API's ``/gallery`` page is drawn by the same functions (:func:`render_card`,
:func:`render_page`), with thumbnails served by the API (a :data:`ThumbUrl` per page).
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memetrace.clusterer.export import ClusterRow
from memetrace.feature_store import FeatureStore

THUMBS_DIR = "thumbs"

ThumbUrl = Callable[[int], str | None]  # image id -> thumbnail URL for <img src>; None = no thumbnail


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


def stat(template: str, value: object) -> str:
    """One header figure: ``template`` with ``{}`` where the bold value goes, e.g. ``stat("{} images", 4)``."""
    before, _, after = template.partition("{}")
    return (f'<span class="stat">{html.escape(before)}<b>{html.escape(str(value))}</b>'
            f'{html.escape(after)}</span>')


def render_thumb(paths: Sequence[str], src: str | None) -> str:
    """One grid cell: the thumbnail at ``src`` (None: a placeholder) captioned with the image's path(s)."""
    title = html.escape("\n".join(paths))
    caption = html.escape(paths[0])
    if len(paths) > 1:
        caption += f' <span class="more">+{len(paths) - 1}</span>'
    if src is not None:
        media = f'<img src="{html.escape(src)}" alt="{html.escape(paths[0])}" loading="lazy">'
    else:
        media = '<div class="missing">no thumbnail</div>'
    return f'<figure class="thumb" title="{title}">{media}<figcaption>{caption}</figcaption></figure>'


def render_card(cluster_id: int, stats: Sequence[str], shown: Sequence[tuple[int, Sequence[str]]], total: int,
                thumb_url: ThumbUrl) -> str:
    """One cluster card: a header of :func:`stat` figures, then ``shown`` (image id, paths) of its
    ``total`` images as a grid of thumbnails."""
    cells = "\n".join(render_thumb(paths, thumb_url(image_id)) for image_id, paths in shown)
    hidden = total - len(shown)
    more = f'<p class="hidden">… and {hidden} more image{"s" if hidden != 1 else ""}</p>' if hidden else ""
    return (
        f'<section class="card" id="cluster-{cluster_id}">\n'
        f'<header><h2>Cluster {cluster_id}</h2>{"".join(stats)}</header>\n'
        f'<div class="grid">\n{cells}\n</div>{more}\n</section>'
    )


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


CSS = """
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2329; --muted: #66707a; --line: #dde1e6; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; background: var(--bg); color: var(--ink);
       font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { margin: 0 0 4px; font-size: 22px; }
.summary { margin: 0 0 20px; color: var(--muted); }
.summary b { color: var(--ink); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
        padding: 14px 16px; margin-bottom: 18px; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.card header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap;
               border-bottom: 1px solid var(--line); padding-bottom: 8px; margin-bottom: 12px; }
.card h2 { margin: 0; font-size: 16px; }
.stat { color: var(--muted); }
.stat b { color: var(--ink); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
.thumb { margin: 0; min-width: 0; }
.thumb img, .missing { display: block; width: 100%; height: 150px; border-radius: 4px;
                       background: #eceff2; border: 1px solid var(--line); }
.thumb img { object-fit: contain; }
.missing { display: flex; align-items: center; justify-content: center;
           color: var(--muted); font-size: 12px; border-style: dashed; }
figcaption { margin-top: 4px; font-size: 11px; color: var(--muted);
             white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.more { color: var(--ink); font-weight: 600; }
.hidden { margin: 10px 0 0; color: var(--muted); font-style: italic; }
.sort { margin: -12px 0 20px; color: var(--muted); }
.sort a { color: var(--ink); margin-left: 10px; }
.sort a.on { font-weight: 600; text-decoration: none; }
"""


def render_page(cards: list[str], summary: str) -> str:
    """The whole HTML document."""
    body = "\n".join(cards)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>memetrace clusters</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>memetrace clusters</h1>\n{summary}\n{body}\n</body>\n</html>\n"
    )


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
