"""The HTML of a cluster gallery: figures, thumbnail cells, cluster cards and the page around them.

Shared by the static gallery of ``memetrace export --html`` (thumbnails copied next to the page)
and the query API's ``/gallery`` (thumbnails served by the API): self-contained pages, inline CSS,
no scripts, every text escaped.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

ThumbUrl = Callable[[int], str | None]  # image id -> thumbnail URL for <img src>; None = no thumbnail


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
        f"<title>memetrace export</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>memetrace export</h1>\n{summary}\n{body}\n</body>\n</html>\n"
    )
