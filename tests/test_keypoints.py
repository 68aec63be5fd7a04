"""memetrace.keypoints: SIFT extraction, the mirror permutation, the flat-patch filter."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from conftest import rgb, sift_config
from memetrace.keypoints import (CONTRAST, FLAT_STD, MIRROR_PERMUTATION, SMOOTH_CONTRAST, Detected, KeypointExtractor,
                                 Keypoints, local_variance, resize_longest, window_share)
from memetrace.settings import Settings

DEFAULTS = Settings.model_fields


def _extractor(flat_max: float | None = None, n_features: int | None = None) -> KeypointExtractor:
    changes = {k: v for k, v in (("flat_max", flat_max), ("n_features", n_features)) if v is not None}
    return KeypointExtractor(sift_config(**changes))


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
    ex = KeypointExtractor(sift_config(n_features=200, max_side=400))
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


def _jpeg(im: Image.Image, quality: int = 85) -> np.ndarray:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return rgb(Image.open(out).convert("RGB"))


def _smooth(photo: Image.Image) -> Image.Image:
    """A photo blurred to soft shading, as a sky or an out-of-focus background."""
    return photo.filter(ImageFilter.GaussianBlur(max(photo.size) / 60))


def test_a_smooth_photo_keeps_its_gentle_texture(photos: dict[str, Image.Image]) -> None:
    smooth = _jpeg(_smooth(photos["astronaut"]))
    strict = KeypointExtractor(sift_config(smooth_points=0)).extract(smooth)  # the flat test alone
    kept = _extractor().extract(smooth)
    assert len(strict) < 20  # a handful (9): nothing RANSAC could verify
    assert len(kept) >= max(50, 4 * len(strict))  # 83


@pytest.mark.parametrize("name", ["astronaut", "cat"])
def test_a_caption_over_a_smooth_photo_stays_dropped(photos: dict[str, Image.Image], name: str) -> None:
    photo = _smooth(photos[name])
    w, h = photo.size
    band = h // 4  # a meme caption: black text on a white band above the photo
    captioned = Image.new("RGB", (w, h + band), "white")
    captioned.paste(photo, (0, band))
    ImageDraw.Draw(captioned).text((10, band // 5), "WHEN THE WIFI SEES YOU", fill="black",
                                   font=ImageFont.load_default(size=band // 2))
    image = _jpeg(captioned, 75)

    def split(kp: Keypoints) -> tuple[int, int]:
        in_band = kp.xy[:, 1] < band * kp.height / image.shape[0]
        return int(in_band.sum()), int((~in_band).sum())

    (band_strict, photo_strict), (band_kept, photo_kept) = (
        split(KeypointExtractor(sift_config(smooth_points=n)).extract(image)) for n in (0, sift_config().smooth_points))
    assert photo_strict < 50  # the smooth rule applies to this image
    assert band_kept == band_strict  # it adds no point on the caption (JPEG rings around the glyphs)...
    assert photo_kept >= 2 * photo_strict + 20  # ...and the photo's gentle ones (26 -> 91, 0 -> 50)


@pytest.mark.parametrize("name", ["astronaut", "cat", "coins"])
def test_a_textured_photo_is_extracted_as_without_the_smooth_pass(photos: dict[str, Image.Image], name: str) -> None:
    im = rgb(photos[name])
    with_pass, without = _extractor().extract(im), KeypointExtractor(sift_config(smooth_points=0)).extract(im)
    assert np.array_equal(with_pass.xy, without.xy) and np.array_equal(with_pass.desc, without.desc)


def test_the_smooth_pass_detects_again_then_adds_gentle_points() -> None:
    """select's three outcomes, on a fake detector: each point's flat shares are given per threshold."""
    # a point: (flat share at std 2, at std 0.5, share of sharp pixels); the variance is a stand-in
    var = np.array([1.0, 0.1, 300.0])  # below 2 ** 2, below 0.5 ** 2, above 16 ** 2

    def run(by_contrast: dict[float, list[tuple[float, float, float]]], floor: int) -> tuple[float, list[bool]]:
        def detect(contrast: float) -> Detected[np.ndarray]:
            points = np.array(by_contrast[contrast], float).reshape(-1, 3)
            return Detected(points, np.full(len(points), contrast), np.zeros(len(points)), np.zeros((len(points), 128)))

        def share(mask: np.ndarray, found: Detected[np.ndarray]) -> np.ndarray:
            column = {(True, True, False): 0, (False, True, False): 1, (False, False, True): 2}[tuple(mask)]
            return found.xy[:, column]

        found, keep = KeypointExtractor(sift_config(smooth_points=floor)).select(var, detect, share)
        return float(found.size[0]), keep.tolist()

    textured = [(0.1, 0.0, 0.0), (0.2, 0.0, 0.0)]
    assert run({CONTRAST: textured}, floor=2) == (CONTRAST, [True, True])  # enough: detected once
    weaker = [(0.1, 0.0, 0.0), (0.9, 0.1, 0.0), (0.9, 0.1, 0.2)]  # strict, gentle, gentle beside an edge
    assert run({CONTRAST: [], SMOOTH_CONTRAST: weaker}, floor=1) == (SMOOTH_CONTRAST, [True, False, False])
    assert run({CONTRAST: [], SMOOTH_CONTRAST: weaker}, floor=3) == (SMOOTH_CONTRAST, [True, True, False])


def test_a_dim_photo_keeps_keypoints(photos: dict[str, Image.Image]) -> None:
    dim = _jpeg(Image.fromarray((np.asarray(photos["astronaut"], np.float32) / 8 + 60).astype(np.uint8)))
    at_opencvs_contrast = KeypointExtractor(sift_config(smooth_points=0)).extract(dim)
    kept = _extractor().extract(dim)  # SIFT again at a quarter of the contrast threshold
    assert len(at_opencvs_contrast) <= 5 and len(kept) >= 50


@pytest.mark.parametrize("name", ["astronaut", "cat", "coins"])
def test_photo_keeps_most_keypoints(photos: dict[str, Image.Image], name: str) -> None:
    unfiltered = _extractor(flat_max=1.01).extract(rgb(photos[name]))
    kept = _extractor().extract(rgb(photos[name]))
    assert len(kept) >= 0.85 * len(unfiltered)


def test_flat_share_around_keypoints() -> None:
    gray = np.zeros((100, 100), np.uint8)
    gray[:, 50:] = np.random.default_rng(0).integers(0, 255, (100, 50))  # right half: noise
    xy = np.array([[20.0, 50.0], [80.0, 50.0], [50.0, 50.0]], np.float32)
    frac = window_share(local_variance(gray) < FLAT_STD ** 2, xy, np.array([4.0, 4.0, 4.0], np.float32))
    assert frac[0] == pytest.approx(1.0)
    assert frac[1] == pytest.approx(0.0, abs=0.01)
    assert 0.3 < frac[2] < 0.7


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_half_size_detection_describes_the_same_points_as_plain_sift(photos: dict[str, Image.Image],
                                                                      name: str) -> None:
    # keypoints found at half size are mapped back to the full frame and described there: matched
    # to plain SIFT's of the same photo, they land on the same pixels (the coordinate and octave
    # mapping is right) and many do (the descriptors are the full-size image's)
    n = DEFAULTS["sift_features"].default
    im = rgb(photos[name])
    plain = KeypointExtractor(sift_config()).extract(im)
    half = KeypointExtractor(sift_config(detect_half=True)).extract(im)
    assert (half.width, half.height) == (plain.width, plain.height) and len(half) >= 0.25 * n
    qi, ti = _ratio_matches(half.desc, plain.desc)
    dist = np.linalg.norm(half.xy[qi] - plain.xy[ti], axis=1)
    assert len(qi) >= 0.3 * len(half)
    assert np.median(dist) < 1.0 and (dist < 3.0).mean() > 0.9
