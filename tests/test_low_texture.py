"""Smooth photos (too few keypoints for RANSAC) on real packaged images, through ``memetrace index``:
linked to their near-exact copies by their gently shaded keypoints and the low-texture rule, never
to other smooth pictures.

The set comes from :mod:`benchmarks.low_texture` (scikit-image samples blurred into smooth
photos, a sky cut from the rocket launch, gradients, flat graphics), a few of each to stay lean.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.low_texture import COPIES, ORIGINAL, distractors, score, smooth_photos, write_set
from conftest import make_settings, rgb
from memetrace.cli.batch import index_notes, run_index
from memetrace.cli.context import Context
from memetrace.cli.tables import cluster_table, few_keypoint_paths, stored_counts
from memetrace.matcher.query import CopyFinder
from memetrace.matcher.low_texture import SIDE, agreement, sketch_of_rgb
from memetrace.matcher.verify import Prepared
from memetrace.keypoints import KeypointExtractor, SiftConfig

PHOTOS = ("rocket_sky", "coffee", "camera")
DISTRACTORS = ("gradient0", "gradient1", "gradient3", "graphic0", "graphic1", "moon_soft", "retina_soft")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("smooth")
    return root, write_set(root, PHOTOS, DISTRACTORS)


def _clusters(folder: Path, data: Path, embedder, **overrides) -> tuple[dict[str, str], dict, Context]:
    c = Context(make_settings(data, **overrides), embedder=embedder)
    summary = run_index(c, folder, show_progress=False)
    return ({Path(r.path).name: str(r.cluster_id) for r in cluster_table(c) if r.cluster_id is not None},
            summary, c)


def test_the_photos_are_too_smooth_for_local_verification(folder, tmp_path: Path) -> None:
    s = make_settings(tmp_path)
    extractor = KeypointExtractor(SiftConfig.from_settings(s))
    root, _ = folder
    counts = {name: len(extractor.extract(rgb(Image.open(root / f"{name}__{ORIGINAL}.png")))) for name in PHOTOS}
    assert all(n < s.low_texture_points for n in counts.values()), counts


def test_smooth_photos_find_their_copies_and_nothing_else(folder, tmp_path: Path, embedder) -> None:
    root, source = folder
    every_copy = {kind: len(PHOTOS) for kind in COPIES}
    # the two ways such a photo is verified: its gently shaded keypoints (sift_smooth_points), and
    # the whole-image rule when even those are too few (low_texture_points)
    neither = score(_clusters(root, tmp_path / "neither", embedder, low_texture_points=0, sift_smooth_points=0)[0],
                    source)
    points = score(_clusters(root, tmp_path / "points", embedder, low_texture_points=0)[0], source)
    _, _, whole_image = _clusters(root, tmp_path / "whole", embedder, sift_smooth_points=0)
    clusters, summary, c = _clusters(root, tmp_path / "on", embedder)
    on = score(clusters, source)
    assert sum(neither["copies_found"].values()) == 0  # without either the copies are lost
    assert sum(points["copies_found"].values()) >= 2 * len(PHOTOS) and points["false_links"] == 0, points
    assert on["copies_found"] == every_copy, on
    assert on["false_links"] == 0, clusters
    # index and stats name the smooth images
    smooth = {f for f in source if f.startswith(PHOTOS)}
    assert summary["few_keypoints"] >= len(smooth)
    notes = index_notes(c, summary)
    assert any("fewer than 50 keypoints" in n for n in notes) and sum(n.startswith("  ") for n in notes) == 5
    stats = stored_counts(c)
    assert stats["few_keypoints"] == summary["few_keypoints"] and len(stats["few_keypoint_paths"]) == 10
    assert set(few_keypoint_paths(c)) >= smooth
    # an outside query (memetrace query, POST /v1/search): an edit never indexed finds the original
    original = {p: i for i, ps in c.catalog.paths_by_image().items() for p in ps}
    buf = io.BytesIO()
    COPIES["grayscale"](COPIES["rescaled"](smooth_photos()["coffee"])).save(buf, format="JPEG", quality=70)
    _, found = CopyFinder(c).find(buf.getvalue())
    assert original[str(root / f"coffee__{ORIGINAL}.png")] in {f.image_id for f in found}
    # without the smooth photos' keypoints, the whole-image rule alone finds it (0 inliers)
    stored = {p: i for i, ps in whole_image.catalog.paths_by_image().items() for p in ps}
    _, found = CopyFinder(whole_image).find(buf.getvalue())
    inliers = {f.image_id: f.inliers for f in found}
    assert inliers.get(stored[str(root / f"coffee__{ORIGINAL}.png")]) == 0


def test_distinct_smooth_pictures_do_not_agree() -> None:
    pictures = [*smooth_photos().values(), *distractors().values()]  # the whole set, not the indexed subset
    sketches = [sketch_of_rgb(rgb(im)) for im in pictures]
    frames = [Prepared(_no_points(im)) for im in pictures]
    scores = [agreement(frames[i], sketches[i], frames[j], sketches[j])[0]
              for i in range(len(pictures)) for j in range(i + 1, len(pictures))]
    assert max(scores) < make_settings(Path(".")).low_texture_min_agreement, max(scores)


def test_a_copy_agrees_with_the_shift_and_scale_of_its_crop() -> None:
    im = smooth_photos()["rocket_sky"]
    crop = COPIES["cropped"](im)
    a, b = Prepared(_no_points(im)), Prepared(_no_points(crop))
    score_, model = agreement(a, sketch_of_rgb(rgb(im)), b, sketch_of_rgb(rgb(crop)))
    assert score_ >= make_settings(Path(".")).low_texture_min_agreement
    # the crop drops 6 % of each side: the original's point (0.06 w, 0.06 h) is the crop's origin
    x, y = model @ np.array([0.06 * im.width, 0.06 * im.height, 1.0])
    # searched on SIDE px thumbnails at ~7 % size steps: a few thumbnail pixels off at most
    tol = 3 * max(crop.size) / SIDE
    assert abs(x) < tol and abs(y) < tol, (x, y)
    assert abs(model[0, 0] - 1.0) < 0.08


def _no_points(im: Image.Image):
    from memetrace.keypoints import Keypoints

    return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), im.width, im.height)
