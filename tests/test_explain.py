"""Why two images match: the geometry read from the verification's model, the explain picture, and
the CLI verbs that show them (``explain``, ``matches``, ``query``'s geometry)."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_settings
from memetrace.imageio import DecodeLimits, content_id
from memetrace.keypoints import KeypointExtractor, SiftConfig
from memetrace.matcher.explain import BOX, CAPTION, HEIGHT, LINE, Side, caption, draw, explain, scaled_width, side_of_bytes
from memetrace.matcher.verify import VerifyConfig
from memetrace.settings import Settings
from test_pipeline import invoke

CROP = (120, 60, 420, 330)  # the region of the astronaut photo pasted into the collage
AT = (380, 150)  # where its top-left corner lands in the 900 x 640 collage
THUMBNAIL_SIDE = Settings.model_fields["thumbnail_side"].default


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _collage(photos: dict[str, Image.Image], other_tile: bool = True) -> Image.Image:
    canvas = Image.new("RGB", (900, 640), (255, 255, 255))
    if other_tile:  # sharing nothing with the crop
        canvas.paste(photos["coins"].resize((300, 300)), (20, 20))
    canvas.paste(photos["astronaut"].crop(CROP), AT)
    return canvas


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory):
    s = make_settings(tmp_path_factory.mktemp("explain"))
    extractor = KeypointExtractor(SiftConfig.from_settings(s))

    def side(im: Image.Image, label: str = "") -> Side:
        return side_of_bytes(_png(im), label, extractor, DecodeLimits.from_settings(s))

    return side, VerifyConfig.from_settings(s)


def _near(box, expected, tol: float) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(box, expected))


def test_the_boxes_are_where_the_crop_was_pasted_and_drawn_there(photos, tools) -> None:
    side, config = tools
    crop = photos["astronaut"].crop(CROP)
    a, b = side(crop), side(_collage(photos))
    e = explain(a, b, config, THUMBNAIL_SIDE)
    g = e.geometry
    assert g is not None and e.kind == "partial" and g.inliers >= 10 and not g.mirrored
    w, h = crop.size
    assert _near(g.box_b, (AT[0], AT[1], AT[0] + w, AT[1] + h), 8), g.box_b  # in the collage's pixels
    assert g.box_a == (0, 0, w, h)  # all of the crop is in the collage
    assert abs(g.scale - 1) < 0.02 and abs(g.rotation) < 1 and g.size_a == (w, h) and g.size_b == (900, 640)
    lines_in_b = e.lines[:, 2:]
    assert (lines_in_b >= np.array(g.box_b[:2])).all() and (lines_in_b <= np.array(g.box_b[2:])).all()

    picture = draw(a, b, e)
    wa, wb = scaled_width(a.size), scaled_width(b.size)
    assert picture.size == (wa + wb, HEIGHT + CAPTION) == (round(w * HEIGHT / h) + round(900 * HEIGHT / 640),
                                                           HEIGHT + CAPTION)
    px = np.asarray(picture)
    f = HEIGHT / 640
    x0, y0, x1, y1 = (round(v * f) for v in g.box_b)
    assert tuple(px[y0 + 1, wa + (x0 + x1) // 2]) == BOX and tuple(px[(y0 + y1) // 2, wa + x0 + 1]) == BOX
    assert tuple(px[HEIGHT - 10, wa + wb - 10]) == (255, 255, 255)  # the collage's white corner: no box there
    assert (px[:HEIGHT] == LINE).all(axis=2).sum() > 100  # inlier lines


def test_a_turned_mirrored_smaller_copy_and_the_reverse_view_agree(photos, tools) -> None:
    side, config = tools
    photo = photos["astronaut"]
    copy = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(90, expand=True)  # PIL: counter-clockwise
    copy = copy.resize((copy.width // 2, copy.height // 2))
    a, b = side(photo), side(copy)
    g = explain(a, b, config, THUMBNAIL_SIDE).geometry
    assert g is not None and g.mirrored and abs(g.rotation - 90) < 2 and abs(g.scale - 0.5) < 0.02, g
    back = explain(b, a, config, THUMBNAIL_SIDE).geometry
    swapped = g.swapped()
    assert back is not None and back.mirrored and abs(back.rotation - swapped.rotation) < 2
    assert abs(back.scale - swapped.scale) < 0.05 and _near(back.box_a, swapped.box_a, 10), (back, swapped)


def test_a_pair_that_does_not_match_is_drawn_and_says_so(photos, tools) -> None:
    side, config = tools
    a, b = side(photos["coffee"]), side(photos["coins"])
    e = explain(a, b, config, THUMBNAIL_SIDE)
    assert e.geometry is None and len(e.lines) == 0 and caption(e) == "no verified match"
    assert draw(a, b, e).size == (scaled_width(a.size) + scaled_width(b.size), HEIGHT + CAPTION)


@pytest.fixture(scope="module")
def indexed(photos, embedder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("explain-cli")
    images = base / "images"
    images.mkdir()
    _collage(photos, other_tile=False).save(images / "collage.png")  # the astronaut holds all of it
    photos["astronaut"].save(images / "astronaut.png")
    photos["coffee"].save(images / "coffee.png")
    data = base / "data"
    result = invoke("--data-dir", str(data), "index", str(images), embedder=embedder)
    assert result.exit_code == 0, result.output
    return images, data


def test_matches_exports_the_verified_edge_as_csv_json_and_graphml(indexed, tmp_path) -> None:
    images, data = indexed
    ids = {content_id((images / n).read_bytes()): n for n in ("collage.png", "astronaut.png")}
    for fmt in ("csv", "json", "graphml"):
        out = tmp_path / f"edges.{fmt}"
        result = invoke("--data-dir", str(data), "matches", "--out", str(out))
        assert result.exit_code == 0, result.output
        if fmt == "csv":
            rows = list(csv.DictReader(out.open()))
            assert [(r["path_a"], r["path_b"]) for r in rows] in ([("collage.png", "astronaut.png")],
                                                                  [("astronaut.png", "collage.png")]), rows
            assert {int(rows[0]["a"]), int(rows[0]["b"])} == set(ids) and int(rows[0]["inliers"]) >= 10
            assert rows[0]["kind"] == "partial"
        elif fmt == "json":
            edges = json.loads(out.read_text())
            assert len(edges) == 1 and {edges[0]["a"], edges[0]["b"]} == set(ids)
        else:
            ns = {"g": "http://graphml.graphdrawing.org/xmlns"}
            graph = ET.parse(out).getroot().find("g:graph", ns)
            nodes = {int(n.get("id")) for n in graph.findall("g:node", ns)}
            edges = graph.findall("g:edge", ns)
            assert nodes == set(ids) and len(edges) == 1
            assert {d.get("key"): d.text for d in edges[0].findall("g:data", ns)}["kind"] == "partial"


def test_query_carries_the_geometry_and_explain_draws_stored_ids(indexed, tmp_path) -> None:
    images, data = indexed
    crop = tmp_path / "crop.png"
    with Image.open(images / "collage.png") as im:
        im.crop((AT[0], AT[1], AT[0] + 300, AT[1] + 270)).save(crop)
    result = invoke("--data-dir", str(data), "query", str(crop), "--json")
    assert result.exit_code == 0, result.output
    matches = {m["paths"][0]: m for m in json.loads(result.stdout)[0]["matches"]}
    assert set(matches) == {"collage.png", "astronaut.png"}
    g = matches["collage.png"]["geometry"]
    assert _near(g["box_b"], (AT[0], AT[1], AT[0] + 300, AT[1] + 270), 8) and abs(g["scale"] - 1) < 0.02
    assert _near(matches["astronaut.png"]["geometry"]["box_b"], CROP, 8)

    out = tmp_path / "pair.png"
    a, b = (str(matches[n]["image_id"]) for n in ("astronaut.png", "collage.png"))
    result = invoke("--data-dir", str(data), "explain", a, b, "--out", str(out))
    assert result.exit_code == 0 and "inliers, partial" in result.output, result.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (HEIGHT + round(900 * HEIGHT / 640), HEIGHT + CAPTION)

    result = invoke("--data-dir", str(data), "explain", str(images / "coffee.png"), a, "--out", str(out))
    assert result.exit_code == 1 and "no verified match" in result.output and out.stat().st_size > 0
    result = invoke("--data-dir", str(data), "explain", "nothing.png", a, "--out", str(out))
    assert result.exit_code == 1 and "neither a readable file nor the id" in result.output


@pytest.mark.parametrize("crop_id,photo_id", [(1, 2), (2, 1)], ids=["crop-is-a", "crop-is-b"])
def test_stored_edges_carry_the_geometry_oriented_a_to_b(photos, tools, crop_id: int, photo_id: int) -> None:
    """match_stored's edges (a < b) get the geometry seen from a, whichever image was the query."""
    from memetrace.feature_store import MemoryFeatureStore
    from memetrace.matcher.matching import MatchConfig, Matcher
    from memetrace.models import ImageRow
    from memetrace.vector_index import MemoryVectorIndex

    side, config = tools
    s = make_settings(Path("unused"))
    index, features = MemoryVectorIndex(4), MemoryFeatureStore()
    for image_id, im in ((crop_id, photos["astronaut"].crop(CROP)), (photo_id, photos["astronaut"])):
        kp = side(im).keypoints
        features.put_keypoints(image_id, kp)
        index.upsert([ImageRow(image_id, f"{image_id}.png", im.width, im.height, 1, len(kp),
                               np.eye(4, dtype=np.float32)[0], np.zeros((0, 4), np.float32))])
    (m,) = Matcher(MatchConfig.from_settings(s), index, features).match_stored([1, 2])
    g = m.geometry if crop_id == m.a else m.geometry.swapped()  # crop -> photo
    assert (m.a, m.b) == (1, 2) and g.size_a == (300, 270) and g.size_b == (480, 480)
    assert g.box_a == (0, 0, 300, 270) and _near(g.box_b, CROP, 6) and abs(g.scale - 1) < 0.02, g
    assert type(g).from_dict(g.to_dict()) == g
