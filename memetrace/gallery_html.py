"""The HTML of a cluster gallery: thumbnail cells, cluster cards, the search box and the page.

Shared by the static gallery of ``memetrace export --html`` (thumbnails copied next to the page)
and the query API's ``/gallery`` (thumbnails and full-size images served by the API): inline CSS,
every text escaped. The static page has no script; the served one loads only its own
``gallery.js`` (the upload box). A card's cells link to the full-size image, the cluster's
earliest copy comes first with an "earliest" badge, and a caption shows the whole file name
(wrapped) with the full path(s) in its tooltip.

Extra per-cluster sections (a tree drawing, a timeline, explain links) are :data:`SectionHook`
callables: each gets the cluster id and its image ids (the cards' order) and returns an HTML
fragment it escaped itself, or "" for none; both galleries take a sequence of them.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from memetrace.models import OccurrenceRow

SectionHook = Callable[[int, Sequence[int]], str]  # (cluster id, image ids) -> HTML fragment or ""


@dataclass(frozen=True)
class Cell:
    """One image of a card: its path(s), thumbnail URL and full-size link (None: none)."""

    image_id: int
    paths: Sequence[str]
    thumb: str | None
    full: str | None
    earliest: bool = False
    first_seen: int = -1  # unix seconds of its earliest post (else file time), -1 = unknown


@dataclass(frozen=True)
class Card:
    """One cluster: header figures (:func:`stat`), ``cells`` shown of its ``total`` images, and
    the extra sections of the hooks."""

    cluster_id: int
    stats: Sequence[str]
    cells: Sequence[Cell]
    total: int
    sections: Sequence[str] = ()


def stat(template: str, value: object) -> str:
    """One header figure: ``template`` with ``{}`` where the bold value goes, e.g. ``stat("{} images", 4)``."""
    before, _, after = template.partition("{}")
    return (f'<span class="stat">{html.escape(before)}<b>{html.escape(str(value))}</b>'
            f'{html.escape(after)}</span>')


def when(unix_s: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix_s)) if unix_s > 0 else "unknown"


def file_name(path: str) -> str:
    """The last segment of a path or URL (what the caption shows in full)."""
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def file_time(path: str) -> int:
    """A local file's modification time (unix seconds), -1 when it is no readable local file."""
    if is_url(path):
        return -1
    try:
        return int(os.stat(path).st_mtime)
    except (OSError, ValueError):
        return -1


def first_seen(posts: Iterable[OccurrenceRow], files: Mapping[int, Sequence[str]]) -> dict[int, int]:
    """Image id -> unix seconds of its earliest post (posting time, else when it was stored), else
    the oldest modification time of its local ``files``."""
    times: dict[int, int] = {}
    for r in posts:
        t = r.posted_at if r.posted_at >= 0 else r.seen_at
        if t >= 0 and t < times.get(r.image_id, t + 1):
            times[r.image_id] = t
    for image_id, paths in files.items():
        if image_id not in times and (mtimes := [t for p in paths if (t := file_time(p)) >= 0]):
            times[image_id] = min(mtimes)
    return times


def earliest_first(image_ids: Sequence[int], times: Mapping[int, int]) -> tuple[list[int], int | None]:
    """``image_ids`` with the earliest copy moved first, and that copy: the one with the smallest
    known time. None (order kept) when no time is known or several copies share the smallest, as
    files written in the same second do: no copy is then known to be first."""
    known = sorted((times[i], i) for i in image_ids if times.get(i, -1) >= 0)
    if not known or (len(known) > 1 and known[1][0] == known[0][0]):
        return list(image_ids), None
    first = known[0][1]
    return [first, *(i for i in image_ids if i != first)], first


def render_cell(cell: Cell) -> str:
    """One grid cell: the thumbnail (linked to the full-size image) and the file name(s)."""
    title = "\n".join(cell.paths)
    if cell.first_seen > 0:
        title += f"\nfirst seen {when(cell.first_seen)}"
    alt = html.escape(cell.paths[0] if cell.paths else str(cell.image_id))
    if cell.thumb is not None:
        media = f'<img src="{html.escape(cell.thumb)}" alt="{alt}" loading="lazy">'
    else:
        media = '<div class="missing">no thumbnail</div>'
    if cell.full is not None:
        media = f'<a class="full" href="{html.escape(cell.full)}" target="_blank" rel="noopener">{media}</a>'
    names = [file_name(p) for p in cell.paths] or [str(cell.image_id)]
    caption = html.escape(names[0])
    if len(names) > 1:
        caption += f' <span class="more">+{len(names) - 1}</span>'
    badge = '<span class="badge">earliest</span>' if cell.earliest else ""
    classes = "thumb earliest" if cell.earliest else "thumb"
    return (f'<figure class="{classes}" data-image="{cell.image_id}" title="{html.escape(title)}">{media}'
            f"{badge}<figcaption>{caption}</figcaption></figure>")


def render_card(card: Card) -> str:
    """One cluster card: header, grid of cells, "and N more", then the hooks' sections."""
    cells = "\n".join(render_cell(c) for c in card.cells)
    hidden = card.total - len(card.cells)
    more = f'<p class="hidden">… and {hidden} more image{"s" if hidden != 1 else ""}</p>' if hidden else ""
    sections = "".join(f"\n{s}" for s in card.sections if s)
    return (
        f'<section class="card" id="cluster-{card.cluster_id}">\n'
        f'<header><h2>Cluster {card.cluster_id}</h2>{"".join(card.stats)}</header>\n'
        f'<div class="grid">\n{cells}\n</div>{more}{sections}\n</section>'
    )


def card_sections(hooks: Sequence[SectionHook], cluster_id: int, image_ids: Sequence[int]) -> list[str]:
    return [h(cluster_id, image_ids) for h in hooks]


def search_box(needs_token: bool) -> str:
    """The served gallery's upload box (``gallery.js`` posts the file to ``v1/search``)."""
    token = ('<input type="password" name="token" placeholder="API token" autocomplete="off" '
             'aria-label="API token">') if needs_token else ""
    return ('<form class="search" id="search" action="v1/search" method="post" enctype="multipart/form-data">'
            '<label>Search by image: <input type="file" name="image" accept="image/*" required></label>'
            f'{token}<button type="submit">Find copies</button><span class="status" aria-live="polite"></span>'
            '</form>\n<div class="results" id="results" hidden></div>')


STATIC_SEARCH_NOTE = ('<p class="search note">Search by image: this page is a static export; '
                      "<code>memetrace serve</code> serves the same gallery at <code>/gallery</code> "
                      "with an upload box.</p>")

CSS = """
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2329; --muted: #66707a; --line: #dde1e6; --mark: #c2410c; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; background: var(--bg); color: var(--ink);
       font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { margin: 0 0 4px; font-size: 22px; }
.summary { margin: 0 0 12px; color: var(--muted); }
.summary b { color: var(--ink); }
.search { margin: 0 0 20px; display: flex; gap: 10px; align-items: center; flex-wrap: wrap; }
.search.note { color: var(--muted); display: block; }
.search .status { color: var(--muted); }
.results { background: var(--card); border: 2px solid var(--ink); border-radius: 8px; padding: 12px 16px;
           margin-bottom: 18px; }
.results h2 { margin: 0 0 10px; font-size: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
        padding: 14px 16px; margin-bottom: 18px; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.card header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap;
               border-bottom: 1px solid var(--line); padding-bottom: 8px; margin-bottom: 12px; }
.card h2 { margin: 0; font-size: 16px; }
.stat { color: var(--muted); }
.stat b { color: var(--ink); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
.thumb { margin: 0; min-width: 0; position: relative; }
.thumb a.full { display: block; cursor: zoom-in; }
.thumb img, .missing { display: block; width: 100%; height: 150px; border-radius: 4px;
                       background: #eceff2; border: 1px solid var(--line); }
.thumb img { object-fit: contain; }
.thumb.earliest img, .thumb.earliest .missing { border: 2px solid var(--mark); }
.badge { position: absolute; top: 6px; left: 6px; background: var(--mark); color: #fff; font-size: 11px;
         font-weight: 600; padding: 1px 6px; border-radius: 3px; }
.missing { display: flex; align-items: center; justify-content: center;
           color: var(--muted); font-size: 12px; border-style: dashed; }
figcaption { margin-top: 4px; font-size: 11px; color: var(--muted); overflow-wrap: anywhere; }
.more { color: var(--ink); font-weight: 600; }
.hidden { margin: 10px 0 0; color: var(--muted); font-style: italic; }
.sort { margin: -4px 0 16px; color: var(--muted); }
.sort a { color: var(--ink); margin-left: 10px; }
.sort a.on { font-weight: 600; text-decoration: none; }
"""


def render_page(cards: list[str], summary: str, search: str = "", script: str | None = None,
                title: str = "memetrace export") -> str:
    """The whole HTML document: ``summary``, then ``search`` (box or note), then the cards;
    ``script``: the URL of the page's one script (None: no script)."""
    body = "\n".join(cards)
    tag = f'<script src="{html.escape(script)}" defer></script>\n' if script else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n{tag}</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{summary}\n{search}\n{body}\n</body>\n</html>\n"
    )
