"""``GET /gallery``: the clusters on the cluster board as the HTML page of ``memetrace export --html``
(same cards, same CSS), with thumbnails from ``/v1/images/{id}/thumbnail``, full-size images from
``/v1/images/{id}/file``, and an upload box (``/gallery.js``) that searches by image."""

from __future__ import annotations

import html
from collections.abc import Sequence
from importlib.resources import files

from memetrace.api.records import Sort, sorted_summaries
from memetrace.cluster_board import ClusterBoard
from memetrace.gallery_html import (Card, Cell, SectionHook, card_sections, earliest_first, first_seen, render_card,
                                    render_page, search_box, stat, when)
from memetrace.models import ClusterSummary
from memetrace.occurrence_log import OccurrenceLog
from memetrace.vector_index import VectorIndex

THUMBS_PER_CARD = 12
DATED_PER_CARD = 200  # the earliest copy is looked for among a cluster's first members (by id): bounded reads
SORT_LABELS: dict[str, str] = {"size": "largest", "growth": "fastest-growing", "recent": "most recent"}
SCRIPT = files("memetrace.api") / "static" / "gallery.js"


def script() -> bytes:
    """The upload box's script, served as ``/gallery.js``."""
    return SCRIPT.read_bytes()


def _stats(c: ClusterSummary) -> list[str]:
    platforms = ", ".join(f"{p} {n}" for p, n in sorted(c.platforms.items(), key=lambda kv: (-kv[1], kv[0])))
    return [stat("{} images", c.images), stat("{} posts", c.posts), stat("{} in the last hour", f"+{c.growth_hour}"),
            stat("{} in the last day", f"+{c.growth_day}"), stat("first seen {}", when(c.first_seen)),
            stat("last seen {}", when(c.last_seen)), stat("platforms: {}", platforms or "none")]


def _header(shown: list[ClusterSummary], total: int, sort: Sort, unclustered: int) -> str:
    on = ' class="on"'
    links = "".join(f'<a href="?sort={key}"{on if key == sort else ""}>{html.escape(label)}</a>'
                    for key, label in SORT_LABELS.items())
    nav = f'<p class="sort">show first:{links}</p>'
    alone = f" · <b>{unclustered}</b> images in no cluster"
    if not shown:
        return ('<p class="summary empty">No clusters yet: clusters of 2 or more images appear here once '
                f"<code>memetrace index</code> or the clusterer service has published them{alone}.</p>")
    of = f" of {total}" if len(shown) < total else ""
    return (f'<p class="summary"><b>{len(shown)}</b>{of} clusters shown · '
            f"<b>{sum(c.images for c in shown)}</b> images · <b>{sum(c.posts for c in shown)}</b> posts{alone}</p>\n"
            f"{nav}")


def gallery_page(board: ClusterBoard, index: VectorIndex, log: OccurrenceLog, sort: Sort, limit: int,
                 needs_token: bool = False, hooks: Sequence[SectionHook] = ()) -> str:
    """The page of the first ``limit`` clusters in ``sort`` order, up to THUMBS_PER_CARD images each
    (the earliest copy first, by its posts, else its file's time)."""
    summaries = sorted_summaries(board.summaries(), sort)
    shown = summaries[:limit]
    members = {c: ids[:DATED_PER_CARD] for c, ids in board.members([c.cluster_id for c in shown]).items()}
    all_ids = [i for ids in members.values() for i in ids]
    rows = index.get(all_ids)
    times = first_seen(log.occurrences_of(all_ids) if all_ids else [], {i: [r.path] for i, r in rows.items()})
    cards = []
    for c in shown:
        ids, first = earliest_first(members[c.cluster_id], times)
        ids = ids[:THUMBS_PER_CARD]
        cells = [Cell(i, [rows[i].path] if i in rows else [], f"v1/images/{i}/thumbnail",  # relative: works
                      f"v1/images/{i}/file", i == first, times.get(i, -1))  # under a proxy's path prefix too
                 for i in ids]
        cards.append(render_card(Card(c.cluster_id, _stats(c), cells, c.images,
                                      card_sections(hooks, c.cluster_id, ids))))
    unclustered = max(0, index.count() - sum(c.images for c in summaries))
    return render_page(cards, _header(shown, len(summaries), sort, unclustered), search_box(needs_token),
                       script="gallery.js", title="memetrace gallery")
