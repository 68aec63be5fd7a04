"""A cluster's derivation tree and post timeline as an HTML fragment (a gallery section hook).

The tree is a nested list, origin first, each image a thumbnail with the edit that made it from
its parent; the timeline is an inline SVG of the cluster's posts per hour, one colour per platform
(wider bins when the posts span more than :data:`MAX_BINS` hours). No script: the served gallery's
CSP allows inline SVG and styles only.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from memetrace.gallery_html import SectionHook
from memetrace.models import Derivation, OccurrenceRow
from memetrace.occurrence_log import OccurrenceLog
from memetrace.tree_store import NOT_POSTS, TreeStore, earliest_posts

MAX_BINS = 240
MAX_NODES = 200  # a card draws at most this many images of its tree
COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]


def tree_html(tree: Sequence[Derivation], thumb: Callable[[int], str | None], order: Callable[[int], int]) -> str:
    """Nested lists from the roots; ``order``: sort key of siblings (e.g. first post time)."""
    children: dict[int | None, list[Derivation]] = {}
    for d in tree:
        children.setdefault(d.parent, []).append(d)
    drawn = 0

    def branch(parent: int | None, depth: int) -> str:
        nonlocal drawn
        items = []
        for d in sorted(children.get(parent, []), key=lambda d: (order(d.image_id), d.image_id)):
            if drawn >= MAX_NODES or depth > 64:
                break
            drawn += 1
            src = thumb(d.image_id)
            img = f'<img class="tree-thumb" src="{html.escape(src)}" alt="" loading="lazy" width="64">' if src else ""
            label = ("origin" if d.parent is None else html.escape(d.edit)) + f" {d.confidence:.2f}"
            items.append(f'<li data-image="{d.image_id}"><span class="node">{img}<small>{label}</small></span>'
                         + branch(d.image_id, depth + 1) + "</li>")
        return f"<ul>{''.join(items)}</ul>" if items else ""

    return f'<div class="tree">{branch(None, 0)}</div>'


def timeline_svg(posts: Iterable[OccurrenceRow], width: int = 640, height: int = 80) -> str:
    """Posts per hour (or wider bins), stacked by platform; "" without dated posts."""
    dated = [(p.posted_at, p.platform or "?") for p in posts if p.posted_at >= 0 and p.platform not in NOT_POSTS]
    if not dated:
        return ""
    start = min(t for t, _ in dated)
    hours = max(t for t, _ in dated) // 3600 - start // 3600 + 1
    per = max(1, math.ceil(hours / MAX_BINS))
    bins: Counter[tuple[int, str]] = Counter(((t // 3600 - start // 3600) // per, p) for t, p in dated)
    platforms = sorted({p for _, p in dated})
    n_bins = (hours + per - 1) // per
    totals = Counter()
    for (b, _), n in bins.items():
        totals[b] += n
    top, w = max(totals.values()), width / n_bins
    rects = []
    for b in range(n_bins):
        y = float(height)
        for k, p in enumerate(platforms):
            n = bins.get((b, p), 0)
            if n:
                h = n / top * (height - 4)
                y -= h
                rects.append(f'<rect x="{b * w:.1f}" y="{y:.1f}" width="{max(w - 0.5, 0.5):.1f}" height="{h:.1f}" '
                             f'fill="{COLOURS[k % len(COLOURS)]}"><title>{html.escape(p)}: {n}</title></rect>')
    legend = " ".join(f'<span style="color:{COLOURS[k % len(COLOURS)]}">&#9632; {html.escape(p)}</span>'
                      for k, p in enumerate(platforms))
    return (f'<figure class="timeline"><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="posts per {per} h">{"".join(rects)}</svg>'
            f'<figcaption>posts per {per} h by platform: {legend}</figcaption></figure>')


def tree_section(store: TreeStore, log: OccurrenceLog | None, thumb: Callable[[int], str | None]) -> SectionHook:
    """The gallery hook: the card's tree (origin first) and the timeline of its posts."""

    def section(cluster_id: int, image_ids: Sequence[int]) -> str:
        tree = store.get(cluster_id)
        if not tree:
            return ""
        posts = log.occurrences_of([d.image_id for d in tree]) if log is not None else []
        first = earliest_posts(posts)
        drawing = tree_html(tree, thumb, lambda i: first[i].posted_at if i in first else 2**62)
        return f'<section class="derivation"><h3>Derivation tree</h3>{drawing}{timeline_svg(posts)}</section>'

    return section
