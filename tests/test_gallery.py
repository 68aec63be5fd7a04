"""clusterer.gallery: the static HTML page of the clusters."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from memetrace.clusterer.export import ClusterRow
from memetrace.clusterer.gallery import thumb_name, write_gallery
from memetrace.feature_store import MemoryFeatureStore

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
    assert "No clusters of 2 or more images." in page
    assert list((tmp_path / "empty" / "thumbs").iterdir()) == []
