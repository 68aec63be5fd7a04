"""The gallery: the static HTML page of the clusters (clusterer.gallery), the served ``/gallery``
(api.gallery), ``/docs`` offline, and both rendered in a headless browser."""

from __future__ import annotations

import io
import os
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from fastapi.responses import HTMLResponse, Response
from PIL import Image

from memetrace.api.gallery import gallery_page
from memetrace.cli.batch import run_index
from memetrace.cli.context import Context
from memetrace.cluster_board import MemoryClusterBoard
from memetrace.clusterer.export import ClusterRow
from memetrace.clusterer.gallery import thumb_name, write_gallery
from memetrace.feature_store import MemoryFeatureStore
from memetrace.imageio import content_id
from memetrace.models import ClusterSummary, ImageRow, OccurrenceRow
from memetrace.occurrence_log import MemoryOccurrenceLog
from memetrace.vector_index import MemoryVectorIndex
from tests.browser import render, require_browser
from tests.conftest import make_settings
from tests.test_api import Api, _api_context, _corpus, _serve

EVIL = "memes/<script>alert('x')</script>.jpg"
NO_THUMB = 32  # image id whose thumbnail the store lacks


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (shade, 80, 255 - shade)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _rows() -> list[ClusterRow]:
    """Cluster 3: 4 images (5 paths), cluster 5: 3 images, cluster 7: 2 images, plus 2 singletons."""
    spec = {3: [10, 11, 12, 13], 5: [20, 21, 22], 7: [30, NO_THUMB], 8: [40], 9: [41]}
    rows = []
    for cid, images in spec.items():
        for image in images:
            rows.append(ClusterRow(f"img/{image}.jpg", image, 100, 1, cid, 0.5 + cid / 100))
    rows.append(ClusterRow("img/10-again.jpg", 10, 100, 1, 3, 0.53))
    rows[4] = ClusterRow(EVIL, 20, 100, 1, 5, 0.55)  # first image of cluster 5
    # clusters listed smallest first, to check the page sorts them
    return sorted(rows, key=lambda r: r.cluster_id, reverse=True)


@pytest.fixture
def store() -> MemoryFeatureStore:
    s = MemoryFeatureStore()
    for image in (10, 11, 12, 13, 20, 21, 22, 30, 40, 41):
        s.put_thumbnail(image, _jpeg(image))
    return s


def _card_ids(page: str) -> list[int]:
    return [int(m) for m in re.findall(r'<section class="card" id="cluster-(\d+)"', page)]


def test_page_cards_in_size_order(tmp_path: Path, store: MemoryFeatureStore) -> None:
    page_path = write_gallery(_rows(), store, tmp_path / "gallery")
    assert page_path == tmp_path / "gallery" / "index.html"
    page = page_path.read_text(encoding="utf-8")
    assert _card_ids(page) == [3, 5, 7]  # singletons 8 and 9 left out
    assert "<b>3</b> clusters shown" in page and "<b>9</b> images clustered" in page
    assert re.search(r"<b>4</b> images</span><span class=\"stat\"><b>5</b> paths", page)
    assert "quality <b>0.53</b>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()


def test_path_is_escaped(tmp_path: Path, store: MemoryFeatureStore) -> None:
    page = write_gallery(_rows(), store, tmp_path).read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_thumbnails_written_and_placeholder(tmp_path: Path, store: MemoryFeatureStore) -> None:
    page = write_gallery(_rows(), store, tmp_path).read_text(encoding="utf-8")
    written = {p.name for p in (tmp_path / "thumbs").iterdir()}
    assert written == {thumb_name(i) for i in (10, 11, 12, 13, 20, 21, 22, 30)}
    assert (tmp_path / "thumbs" / thumb_name(10)).read_bytes() == store.get_thumbnail(10)
    assert thumb_name(10) == "000000000000000a.jpg"
    assert page.count("<img ") == 8
    assert page.count('class="missing"') == 1 and thumb_name(NO_THUMB) not in page
    assert '<span class="more">+1</span>' in page  # image 10 has two paths


def test_limits(tmp_path: Path, store: MemoryFeatureStore) -> None:
    page = write_gallery(_rows(), store, tmp_path, min_size=3, max_clusters=1, max_thumbs=2)
    text = page.read_text(encoding="utf-8")
    assert _card_ids(text) == [3]
    assert "<b>1</b> of 2 clusters shown" in text and "<b>7</b> images clustered" in text
    assert text.count('<figure class="thumb"') == 2 and "and 2 more images" in text
    assert len(list((tmp_path / "thumbs").iterdir())) == 2


@pytest.mark.parametrize("rows", [[], [ClusterRow("a.jpg", 1, 5, 0, 1, 0.0)]])
def test_no_clusters(tmp_path: Path, store: MemoryFeatureStore, rows: list[ClusterRow]) -> None:
    page = write_gallery(rows, store, tmp_path / "empty").read_text(encoding="utf-8")
    assert _card_ids(page) == []
    assert "No clusters of 2 or more images" in page
    assert list((tmp_path / "empty" / "thumbs").iterdir()) == []


# ------------------------------------------------------------------ static export: issue 15, item 10

LONG = "memes/2024/a-very-long-file-name-that-the-old-gallery-cut-short-with-an-ellipsis.jpg"


def _files(root: Path, rows: list[ClusterRow]) -> None:
    for r in rows:
        (root / r.path).parent.mkdir(parents=True, exist_ok=True)
        (root / r.path).write_bytes(b"jpeg")


def test_thumbnails_link_to_the_full_size_file(tmp_path: Path, store: MemoryFeatureStore) -> None:
    rows = _rows() + [ClusterRow("https://example.org/a.jpg", 50, 1, 1, 4, 0.5),
                      ClusterRow("img/51.jpg", 51, 1, 1, 4, 0.5)]
    root = tmp_path / "photos"
    _files(root, [r for r in rows if not r.path.startswith("https://")])
    page_path = write_gallery(rows, store, tmp_path / "out" / "gallery", root=root)
    page = page_path.read_text(encoding="utf-8")
    links = re.findall(r'<a class="full" href="([^"]+)"', page)
    assert len(links) == page.count('<figure class="thumb') == 11
    assert "https://example.org/a.jpg" in links
    local = [urllib.parse.unquote(h) for h in links if not h.startswith("https://")]
    assert all((page_path.parent / h).resolve().is_file() for h in local), local
    assert "../../photos/img/11.jpg" in local


def test_earliest_copy_first_and_marked(tmp_path: Path, store: MemoryFeatureStore) -> None:
    root = tmp_path / "photos"
    rows = _rows()
    _files(root, rows)
    log = MemoryOccurrenceLog()  # image 12 was posted first; 21 has only its file time
    log.add_occurrences([OccurrenceRow(1, 12, "p1", "u", 1_600_000_000, "reddit", "a"),
                         OccurrenceRow(2, 11, "p2", "u", 1_700_000_000, "reddit", "b")])
    os.utime(root / "img/21.jpg", (1_500_000_000, 1_500_000_000))
    page = write_gallery(rows, store, tmp_path / "g", root=root, log=log).read_text(encoding="utf-8")
    firsts = re.findall(r'<div class="grid">\n<figure class="([^"]+)" data-image="(\d+)"', page)
    assert firsts[:2] == [("thumb earliest", "12"), ("thumb earliest", "21")]
    assert page.count('<span class="badge">earliest</span>') == 2  # 30 and 32: files of the same second, no post
    assert "first seen 2020-09-13 12:26 UTC" in page  # image 12's post, in its tooltip


def test_full_names_wrapped_with_the_path_in_the_title(tmp_path: Path, store: MemoryFeatureStore) -> None:
    rows = [ClusterRow(LONG, 10, 1, 1, 3, 0.5), ClusterRow("img/11.jpg", 11, 1, 1, 3, 0.5)]
    page = write_gallery(rows, store, tmp_path).read_text(encoding="utf-8")
    assert f"<figcaption>{LONG.rsplit('/', 1)[1]}</figcaption>" in page
    assert f'title="{LONG}' in page
    assert "text-overflow" not in page and "overflow-wrap: anywhere" in page


def test_unclustered_count_and_search_note(tmp_path: Path, store: MemoryFeatureStore) -> None:
    page = write_gallery(_rows(), store, tmp_path).read_text(encoding="utf-8")
    assert "<b>2</b> images in no cluster" in page  # singletons 8 and 9
    assert "<form" not in page and "<script" not in page  # a static page cannot search ...
    assert "<code>memetrace serve</code> serves the same gallery" in page  # ... and says where to


def test_section_hooks_add_to_each_card(tmp_path: Path, store: MemoryFeatureStore) -> None:
    seen: list[tuple[int, list[int]]] = []

    def hook(cluster_id: int, image_ids: Sequence[int]) -> str:
        seen.append((cluster_id, list(image_ids)))
        return f'<div class="extra">tree of {cluster_id}</div>' if cluster_id != 7 else ""

    page = write_gallery(_rows(), store, tmp_path, hooks=[hook]).read_text(encoding="utf-8")
    assert [c for c, _ in seen] == [3, 5, 7] and sorted(seen[0][1]) == [10, 11, 12, 13]
    assert re.search(r'</div>\n<div class="extra">tree of 3</div>\n</section>', page)
    assert page.count('class="extra"') == 2


# ------------------------------------------------------------- the served gallery and /docs, offline

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[tuple[Api, dict[str, int]]]:
    """The API corpus (clusters: astronaut 3, cat 2; 2 singletons) served without a token; the crop
    of the astronaut has the earliest post."""
    folder = tmp_path_factory.mktemp("gallery") / "images"
    ids = {name: content_id(data) for name, data in _corpus(folder).items()}
    ctx = Context(make_settings(folder.parent / "data"))
    ctx.embedder = embedder
    run_index(ctx, folder)
    ctx.occurrences.add_occurrences([OccurrenceRow(7, ids["astronaut_crop.jpg"], "p7", "https://x/7", 1_600_000_000,
                                                   "reddit", "a")])
    yield from ((api, ids) for api in _serve(_api_context(ctx.settings, ctx)))


def test_served_gallery_items(served: tuple[Api, dict[str, int]]) -> None:
    api, ids = served
    page = api.get("/gallery")
    html = page.body.decode()
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-eval" not in csp
    assert "<b>2</b> images in no cluster" in html  # coffee and hubble
    first = re.search(r'<div class="grid">\n<figure class="thumb earliest" data-image="(\d+)"', html)
    assert first and int(first[1]) == ids["astronaut_crop.jpg"]  # its post is the earliest
    assert "<figcaption>astronaut_crop.jpg</figcaption>" in html and str(api.ctx.settings.data_dir) not in html
    assert re.search(r'<form class="search" id="search" action="v1/search" method="post" '
                     r'enctype="multipart/form-data"><label>Search by image: <input type="file" name="image"', html)
    assert 'name="token"' not in html  # no token to ask for
    assert '<script src="gallery.js" defer></script>' in html
    js = api.get("/gallery.js")
    assert js.status == 200 and js.headers.get_content_type() == "text/javascript" and b"v1/search" not in js.body[:0]
    crop = ids["astronaut_crop.jpg"]
    assert f'<a class="full" href="v1/images/{crop}/file"' in html
    full = api.get(f"/v1/images/{crop}/file")
    assert full.status == 200 and full.headers.get_content_type() == "image/jpeg"
    assert content_id(full.body) == crop and "sandbox" in full.headers["Content-Security-Policy"]
    assert api.get(f"/v1/images/{crop + 1}/file").status == 404


def test_docs_are_served_without_a_cdn(served: tuple[Api, dict[str, int]]) -> None:
    api = served[0]
    for page, kinds in (("/docs", {"text/javascript", "text/css", "image/png", "application/json"}),
                        ("/redoc", {"text/javascript", "image/png", "application/json"})):
        text = api.get(page).body.decode()
        assert "http" not in text  # no CDN, no font service
        urls = re.findall(r'(?:src|href|spec-url)="([^"]+)"', text) + re.findall(r"url: '([^']+)'", text)
        assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        replies = [api.get(u) for u in urls]
        assert all(r.status == 200 for r in replies) and {r.headers.get_content_type() for r in replies} == kinds
    bundle = api.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status == 200 and b"SwaggerUIBundle" in bundle.body and len(bundle.body) > 500_000
    assert api.get("/docs/assets/nope.js").status == 404


def test_gallery_and_docs_render_in_a_browser(served: tuple[Api, dict[str, int]], tmp_path: Path) -> None:
    require_browser()
    api, ids = served
    gallery = render(f"{api.base}/gallery", png=tmp_path / "gallery.png", width=1280, height=1000)
    assert gallery.console == [], gallery.console  # no JS error, no CSP refusal
    assert gallery.dom.count('class="card"') == 2 and 'id="search"' in gallery.dom
    assert (tmp_path / "gallery.png").stat().st_size > 20_000
    docs = render(f"{api.base}/docs", wait_ms=5000)
    assert docs.errors == [], docs.errors
    assert "opblock" in docs.dom and "/v1/search" in docs.dom  # Swagger UI drew the operations: no CDN needed


def test_upload_box_shows_the_copies_in_a_browser(served: tuple[Api, dict[str, int]], tmp_path: Path) -> None:
    """The box's script posts a file and draws the reply: driven from a page of the API's own origin
    (the CSP allows only same-origin scripts), with a JPEG of the corpus as the chosen file."""
    require_browser()
    api, ids = served
    crop = ids["astronaut_crop.jpg"]
    driver = f"""
document.addEventListener("DOMContentLoaded", async () => {{
  const blob = await (await fetch("v1/images/{crop}/file")).blob();
  const files = new DataTransfer();
  files.items.add(new File([blob], "query.jpg", {{type: "image/jpeg"}}));
  const form = document.getElementById("search");
  form.elements.image.files = files.files;
  form.requestSubmit();
}});"""
    api.app.add_api_route("/gallery-driver.js", lambda: Response(driver, media_type="text/javascript"),
                          include_in_schema=False)
    gallery = api.get("/gallery").body.decode().replace(
        '<script src="gallery.js" defer></script>', '<script src="gallery.js" defer></script>'
                                                    '<script src="gallery-driver.js" defer></script>')
    api.app.add_api_route("/gallery-driven", lambda: HTMLResponse(gallery), include_in_schema=False)
    page = render(f"{api.base}/gallery-driven", wait_ms=20_000, timeout_s=120)
    assert page.errors == [], page.errors
    results = page.dom[page.dom.index('id="results"'):]
    assert "3 copies found" in results, results[:500]
    assert f'href="v1/images/{ids["astronaut.jpg"]}/file"' in results and "identical" in results


def test_served_page_asks_for_the_token_when_one_is_set() -> None:
    """gallery_page alone, on in-memory stores: the token field, the unclustered count, hooks."""
    index, board = MemoryVectorIndex(4), MemoryClusterBoard()
    index.upsert([ImageRow(i, f"/photos/{i}.jpg", 10, 10, 100, 5, np.ones(4, np.float32), np.zeros((0, 4), np.float32))
                  for i in (1, 2, 3, 4, 5)])
    board.publish({1: 9, 2: 9}, [ClusterSummary(9, 2, 2, 100, 200, 0, 0, {"file": 2}, [], 200)])
    page = gallery_page(board, index, MemoryOccurrenceLog(), "size", 10, needs_token=True,
                        hooks=[lambda c, ids: f'<p class="extra">{c}: {list(ids)}</p>'])
    assert 'type="password" name="token"' in page and "<b>3</b> images in no cluster" in page
    assert '<p class="extra">9: [1, 2]</p>' in page
    assert 'class="badge"' not in page  # no post, no readable file: no copy known to be first
