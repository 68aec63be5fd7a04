"""The gallery's links to ``GET /v1/explain``: on each card, from its earliest copy to the others."""

from __future__ import annotations

from collections.abc import Sequence

MAX_LINKS = 12  # per card: the first images after the earliest (a card shows at most a few dozen)


def explain_links(cluster_id: int, image_ids: Sequence[int]) -> str:
    """A gallery section hook (:data:`memetrace.gallery_html.SectionHook`): "why" links from the card's
    earliest copy to each other image. Two images of a cluster may be linked through others only:
    their picture then says "no verified match"."""
    first, others = (image_ids[0], image_ids[1:MAX_LINKS + 1]) if image_ids else (0, [])
    if not others:
        return ""
    links = " ".join(f'<a href="v1/explain?a={first}&amp;b={j}">{n}</a>' for n, j in enumerate(others, 2))
    return f'<p class="explain">why they match, earliest with: {links}</p>'
