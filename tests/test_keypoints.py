"""memetrace.keypoints: SIFT extraction, the mirror permutation, the flat-patch filter."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont, ImageOps

from conftest import rgb
from memetrace.keypoints import MIRROR_PERMUTATION, KeypointExtractor, Keypoints, flat_fraction, resize_longest
from memetrace.settings import Settings

DEFAULTS = Settings.model_fields


def _extractor(flat_max: float | None = None, n_features: int | None = None) -> KeypointExtractor:
    return KeypointExtractor(
        n_features if n_features is not None else DEFAULTS["sift_features"].default,
        DEFAULTS["sift_max_side"].default,
        flat_max if flat_max is not None else DEFAULTS["sift_flat_max"].default,
    )


def _ratio_matches(a: np.ndarray, b: np.ndarray, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Lowe's ratio test, a -> b, brute force on float descriptors."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    order = np.argsort(d, axis=1)[:, :2]
    rows = np.arange(len(a))
    ok = d[rows, order[:, 0]] < (ratio ** 2) * d[rows, order[:, 1]]
    return np.flatnonzero(ok), order[ok, 0]


def _text_image(size: tuple[int, int] = (440, 330)) -> np.ndarray:  # below sift_max_side: no resize
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=40)
    for i, line in enumerate(("WHEN YOU FIND", "THE ORIGINAL", "NOBODY: ME:", "REPOSTING THIS")):
        draw.text((20, 20 + 90 * i), line, fill="black", font=font)
    return rgb(im)


@pytest.mark.parametrize("n", [DEFAULTS["sift_features"].default, 150])
@pytest.mark.parametrize("name", ["astronaut", "cat", "coins"])
def test_sift_on_a_photo(photos: dict[str, Image.Image], name: str, n: int) -> None:
    kp = _extractor(n_features=n).extract(rgb(photos[name]))
    assert 0.5 * n <= len(kp) <= n
    assert kp.xy.dtype == np.float32 and kp.xy.shape == (len(kp), 2)
    assert kp.desc.dtype == np.uint8 and kp.desc.shape == (len(kp), 128)
    w, h = photos[name].size
    scale = min(1.0, DEFAULTS["sift_max_side"].default / max(w, h))  # longest side capped
    assert (kp.width, kp.height) == (max(1, round(w * scale)), max(1, round(h * scale)))
    assert (kp.xy[:, 0] >= 0).all() and (kp.xy[:, 0] < kp.width).all()
    assert (kp.xy[:, 1] >= 0).all() and (kp.xy[:, 1] < kp.height).all()


def test_large_images_are_resized_to_max_side(photos: dict[str, Image.Image]) -> None:
    big = photos["astronaut"].resize((1000, 800))
    ex = KeypointExtractor(200, 400, 0.35)
    kp = ex.extract(rgb(big))
    assert (kp.width, kp.height) == (400, 320)
    assert len(kp) <= 200 and kp.xy[:, 0].max() < 400 and kp.xy[:, 1].max() < 320
    assert resize_longest(np.zeros((10, 20), np.uint8), 40).shape == (10, 20)  # never upscaled


def test_blank_image_gives_empty_keypoints() -> None:
    kp = _extractor().extract(np.full((100, 120, 3), 200, np.uint8))
    assert len(kp) == 0 and kp.desc.shape == (0, 128) and kp.desc.dtype == np.uint8
    assert (kp.width, kp.height) == (120, 100)


def test_mirror_permutation_is_an_involution() -> None:
    assert sorted(MIRROR_PERMUTATION.tolist()) == list(range(128))
    assert (MIRROR_PERMUTATION[MIRROR_PERMUTATION] == np.arange(128)).all()
    assert (MIRROR_PERMUTATION != np.arange(128)).any()


@pytest.mark.parametrize("name", ["astronaut", "coffee", "cameraman"])
def test_mirrored_keypoints_match_sift_on_the_flipped_photo(photos: dict[str, Image.Image], name: str) -> None:
    ex = _extractor()
    kp = ex.extract(rgb(photos[name]))
    flipped = ex.extract(rgb(ImageOps.mirror(photos[name])))
    mirrored = kp.mirrored()
    assert (mirrored.width, mirrored.height) == (kp.width, kp.height)
    fi, mi = _ratio_matches(flipped.desc, mirrored.desc)
    near = np.linalg.norm(flipped.xy[fi] - mirrored.xy[mi], axis=1) < 2.0
    assert near.sum() >= 0.7 * len(flipped), (near.sum(), len(flipped))
    # without the permutation the same descriptors barely match: the permutation does the work
    fi0, _ = _ratio_matches(flipped.desc, kp.desc)
    assert len(fi0) < 0.3 * len(flipped)


def test_mirrored_geometry() -> None:
    kp = Keypoints(xy=np.array([[0.0, 5.0], [9.0, 1.0], [4.5, 2.0]], np.float32),
                   desc=np.arange(3 * 128, dtype=np.uint8).reshape(3, 128), width=10, height=8)
    m = kp.mirrored()
    np.testing.assert_allclose(m.xy, [[9.0, 5.0], [0.0, 1.0], [4.5, 2.0]])
    assert (m.desc == kp.desc[:, MIRROR_PERMUTATION]).all()
    np.testing.assert_allclose(m.mirrored().xy, kp.xy)
    assert (m.mirrored().desc == kp.desc).all()
    assert kp.xy[0, 0] == 0.0  # the original is left untouched


def test_text_on_flat_background_keeps_few_keypoints() -> None:
    text = _text_image()
    unfiltered = _extractor(flat_max=1.01).extract(text)  # flat share is <= 1: nothing dropped
    kept = _extractor().extract(text)
    assert len(unfiltered) >= 100  # SIFT does fire on glyphs...
    assert len(kept) <= 0.1 * len(unfiltered)  # ...but the flat filter drops them


@pytest.mark.parametrize("name", ["astronaut", "cat", "coins"])
def test_photo_keeps_most_keypoints(photos: dict[str, Image.Image], name: str) -> None:
    unfiltered = _extractor(flat_max=1.01).extract(rgb(photos[name]))
    kept = _extractor().extract(rgb(photos[name]))
    assert len(kept) >= 0.85 * len(unfiltered)


def test_flat_fraction() -> None:
    gray = np.zeros((100, 100), np.uint8)
    gray[:, 50:] = np.random.default_rng(0).integers(0, 255, (100, 50))  # right half: noise
    xy = np.array([[20.0, 50.0], [80.0, 50.0], [50.0, 50.0]], np.float32)
    frac = flat_fraction(gray, xy, np.array([4.0, 4.0, 4.0], np.float32))
    assert frac[0] == pytest.approx(1.0)
    assert frac[1] == pytest.approx(0.0, abs=0.01)
    assert 0.3 < frac[2] < 0.7


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_half_size_detection_describes_the_same_points_as_plain_sift(photos: dict[str, Image.Image],
                                                                      name: str) -> None:
    # keypoints found at half size are mapped back to the full frame and described there: matched
    # to plain SIFT's of the same photo, they land on the same pixels (the coordinate and octave
    # mapping is right) and many do (the descriptors are the full-size image's)
    n, side, flat = (DEFAULTS[k].default for k in ("sift_features", "sift_max_side", "sift_flat_max"))
    im = rgb(photos[name])
    plain = KeypointExtractor(n, side, flat).extract(im)
    half = KeypointExtractor(n, side, flat, detect_half=True).extract(im)
    assert (half.width, half.height) == (plain.width, plain.height) and len(half) >= 0.25 * n
    qi, ti = _ratio_matches(half.desc, plain.desc)
    dist = np.linalg.norm(half.xy[qi] - plain.xy[ti], axis=1)
    assert len(qi) >= 0.3 * len(half)
    assert np.median(dist) < 1.0 and (dist < 3.0).mean() > 0.9
