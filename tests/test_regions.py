"""memetrace.regions: content boxes in screenshots, grid windows of the feature map, crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import rgb
from memetrace.regions import GRID, content_boxes, crop, grid_cells


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _screenshot(photo: Image.Image) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The photo in a UI-like page (app bar, avatar, text lines, action bar); its true box."""
    ph = photo.copy()
    ph.thumbnail((360, 360))
    width, height = 420, ph.height + 290
    page = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=16)
    draw.rectangle((0, 0, width, 44), fill=(59, 89, 152))
    draw.text((12, 12), "feed", fill="white", font=font)
    draw.ellipse((20, 60, 50, 90), fill=(120, 150, 200))
    draw.text((60, 66), "@someone  3h", fill="black", font=font)
    for i in range(3):
        draw.text((20, 100 + 22 * i), "lorem ipsum dolor sit amet consectetur", fill="black", font=font)
    x0, y0 = 30, 200
    page.paste(ph, (x0, y0))
    draw.text((20, y0 + ph.height + 24), "Like 12   Comment 4   Share 9", fill=(100, 100, 100), font=font)
    return page, (x0 / width, y0 / height, (x0 + ph.width) / width, (y0 + ph.height) / height)


@pytest.mark.parametrize("name", ["astronaut", "cat", "coffee", "coins"])
def test_content_box_finds_the_photo_in_a_screenshot(photos: dict[str, Image.Image], name: str) -> None:
    page, truth = _screenshot(photos[name])
    boxes = content_boxes(rgb(page))
    assert boxes, "no content box found"
    assert _iou(boxes[0], truth) > 0.7, (boxes[0], truth)
    # the photo's crop is what gets embedded: it is (nearly) the photo itself
    h, w = crop(rgb(page), boxes[0]).shape[:2]
    assert abs(w - (truth[2] - truth[0]) * page.width) < 0.15 * page.width
    assert abs(h - (truth[3] - truth[1]) * page.height) < 0.15 * page.height


@pytest.mark.parametrize("name", ["cat", "coffee", "coins"])
def test_photo_textured_edge_to_edge_has_no_content_box(photos: dict[str, Image.Image], name: str) -> None:
    """A plain photo is one textured component covering (nearly) all of it: not 'a real part'."""
    assert content_boxes(rgb(photos[name])) == []


def test_noise_everywhere_has_no_content_box() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    assert content_boxes(noise) == []
    # the same component is reported once it is a real part of the image
    page = np.full((600, 800, 3), 255, np.uint8)
    page[100:400, 200:600] = noise
    (box,) = content_boxes(page)
    assert _iou(box, (0.25, 100 / 600, 0.75, 400 / 600)) > 0.9


@pytest.mark.parametrize("name", ["astronaut", "cat", "coffee", "rocket", "cameraman", "coins", "hubble", "retina"])
def test_boxes_respect_the_documented_bounds(photos: dict[str, Image.Image], name: str) -> None:
    boxes = content_boxes(rgb(photos[name]), max_boxes=3, min_area=0.04, max_area=0.85)
    assert len(boxes) <= 3
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    for (x0, y0, x1, y1), area in zip(boxes, areas):
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        assert 0.04 <= area <= 0.85 + 1e-9  # never the whole image, never a speck
    assert areas == sorted(areas, reverse=True)  # biggest first


def test_flat_image_has_no_box() -> None:
    assert content_boxes(np.full((300, 400, 3), 255, np.uint8)) == []


def test_collage_tiles_are_found(photos: dict[str, Image.Image]) -> None:
    cw, ch, gap = 200, 150, 24
    page = Image.new("RGB", (2 * cw + 3 * gap, ch + 2 * gap), "white")
    page.paste(photos["astronaut"].resize((cw, ch)), (gap, gap))
    page.paste(photos["coins"].resize((cw, ch)), (2 * gap + cw, gap))
    boxes = content_boxes(rgb(page))
    truths = [(gap / page.width, gap / page.height, (gap + cw) / page.width, (gap + ch) / page.height),
              ((2 * gap + cw) / page.width, gap / page.height, (2 * gap + 2 * cw) / page.width,
               (gap + ch) / page.height)]
    for t in truths:
        assert max(_iou(b, t) for b in boxes) > 0.7


@pytest.mark.parametrize("h,w", [(7, 7), (2, 2), (3, 5), (4, 4), (6, 9), (14, 14)])
def test_grid_cells_cover_the_map(h: int, w: int) -> None:
    cells = grid_cells(h, w)
    assert len(cells) == len(GRID) == 9
    covered = np.zeros((h, w), bool)
    for r0, r1, c0, c1 in cells:
        assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w, (r0, r1, c0, c1)
        covered[r0:r1, c0:c1] = True
    assert covered.all()
    # the halves and the quarters tile the map without overlapping
    for first, n in ((0, 2), (2, 2), (4, 4)):
        area = np.zeros((h, w), int)
        for r0, r1, c0, c1 in cells[first:first + n]:
            area[r0:r1, c0:c1] += 1
        assert (area == 1).all() or min(h, w) < 3


def test_grid_cells_7x7_exact() -> None:
    cells = grid_cells(7, 7)
    assert cells[0] == (0, 7, 0, 4) and cells[1] == (0, 7, 4, 7)  # left / right halves
    assert cells[4] == (0, 4, 0, 4) and cells[7] == (4, 7, 4, 7)  # quarters
    assert cells[8] == (1, 6, 1, 6)  # centre


def test_grid_cells_on_a_single_cell_map() -> None:
    for r0, r1, c0, c1 in grid_cells(1, 1):
        assert 0 <= r0 < r1 <= 1 and 0 <= c0 < c1 <= 1


def test_crop_is_at_least_one_pixel() -> None:
    im = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert crop(im, (0.5, 0.0, 1.0, 0.5)).shape == (5, 10, 3)
    assert (crop(im, (0.5, 0.0, 1.0, 0.5)) == im[0:5, 10:20]).all()
    assert crop(im, (0.5, 0.5, 0.5, 0.5)).shape == (1, 1, 3)
