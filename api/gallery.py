"""``GET /gallery``: the clusters on the cluster board as the HTML page of ``memetrace export --html``
(same cards, same CSS), with thumbnails served by ``/v1/images/{id}/thumbnail``."""

from __future__ import annotations

import html
import time

from memetrace.api.records import Sort, sorted_summaries
from memetrace.gallery_html import render_card, render_page, stat
from memetrace.cluster_board import ClusterBoard
from memetrace.models import ClusterSummary
from memetrace.vector_index import VectorIndex

THUMBS_PER_CARD = 12
SORT_LABELS: dict[str, str] = {"size": "largest", "growth": "fastest-growing", "recent": "most recent"}


def _when(unix_s: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix_s)) if unix_s > 0 else "unknown"


def _name(path: str) -> str:
    """The last segment of a path or URL: the caption must fit under a thumbnail."""
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def _thumb_url(image_id: int) -> str:
    return f"v1/images/{image_id}/thumbnail"  # relative: works under a path prefix behind a proxy too


def _stats(c: ClusterSummary) -> list[str]:
    platforms = ", ".join(f"{p} {n}" for p, n in sorted(c.platforms.items(), key=lambda kv: (-kv[1], kv[0])))
    return [stat("{} images", c.images), stat("{} posts", c.posts), stat("{} in the last hour", f"+{c.growth_hour}"),
            stat("{} in the last day", f"+{c.growth_day}"), stat("first seen {}", _when(c.first_seen)),
            stat("last seen {}", _when(c.last_seen)), stat("platforms: {}", platforms or "none")]


def _header(shown: list[ClusterSummary], total: int, sort: Sort) -> str:
    on = ' class="on"'
    links = "".join(f'<a href="?sort={key}"{on if key == sort else ""}>{html.escape(label)}</a>'
                    for key, label in SORT_LABELS.items())
    nav = f'<p class="sort">show first:{links}</p>'
    if not shown:
        return ('<p class="summary empty">No clusters yet: clusters of 2 or more images appear here once '
                "<code>memetrace index</code> or the clusterer service has published them.</p>")
    of = f" of {total}" if len(shown) < total else ""
    return (f'<p class="summary"><b>{len(shown)}</b>{of} clusters shown · '
            f"<b>{sum(c.images for c in shown)}</b> images · <b>{sum(c.posts for c in shown)}</b> posts</p>\n{nav}")


def gallery_page(board: ClusterBoard, index: VectorIndex, sort: Sort, limit: int) -> str:
    """The page of the first ``limit`` clusters in ``sort`` order, up to THUMBS_PER_CARD images each."""
    summaries = sorted_summaries(board.summaries(), sort)
    shown = summaries[:limit]
    members = {c: ids[:THUMBS_PER_CARD] for c, ids in board.members([c.cluster_id for c in shown]).items()}
    rows = index.get([i for ids in members.values() for i in ids])
    cards = [render_card(c.cluster_id, _stats(c),
                         [(i, [_name(rows[i].path) if i in rows else str(i)]) for i in members[c.cluster_id]],
                         c.images, _thumb_url)
             for c in shown]
    return render_page(cards, _header(shown, len(summaries), sort))
