"""The overlay check (memetrace.matcher.overlay) on real packaged photos, through the matcher.

An unmoved same-size pair whose inliers lie in a small part of the picture is what the keypoints
cannot decide: a caption drawn over a smooth photo, and two posts of one web page around different
pictures, one of them smooth, both look like that. The thumbnails decide: the caption leaves the
photo visible around its strokes, a different picture does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image, ImageDraw, ImageFont, ImageOps

from benchmarks.low_texture import distractors, smooth_photos
from memetrace.feature_store import MemoryFeatureStore
from memetrace.imageio import make_thumbnail
from memetrace.keypoints import KeypointExtractor, Keypoints
from memetrace.matcher.matching import MatchConfig, Matcher
from memetrace.matcher.overlay import agreement, gray_of_rgb
from memetrace.matcher.verify import Prepared, Verification, Verifier, VerifyConfig
from memetrace.models import ImageRow
from memetrace.settings import Settings
from memetrace.vector_index import MemoryVectorIndex
from test_verify import _overlaid_caption, extractor, settings  # noqa: F401


def _sample(name: str) -> Image.Image:
    with Image.open(Path(skimage.__file__).parent / "data" / name) as f:
        return f.convert("RGB")


def _web_page(picture: Image.Image) -> Image.Image:
    """A news page: header, a textured ad, the post's picture, lines of text (the same around every picture)."""
    page = Image.new("RGB", (640, 720), (250, 250, 250))
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, 640, 56), fill=(35, 35, 35))
    draw.text((16, 14), "news of the day", fill="white", font=ImageFont.load_default(size=26))
    page.paste(ImageOps.fit(_sample("coins.png"), (150, 110)), (460, 90))
    page.paste(ImageOps.fit(picture, (400, 300)), (24, 90))
    for k in range(6):
        draw.text((24, 420 + 40 * k), "Lorem ipsum dolor sit amet", fill=(40, 40, 40),
                  font=ImageFont.load_default(size=20))
    return page


def _matches(settings: Settings, extractor: KeypointExtractor, a: Image.Image, b: Image.Image) -> int:
    """Matches the matcher finds between a (id 1) and b (id 2), stored with their thumbnails."""
    index, features = MemoryVectorIndex(4), MemoryFeatureStore()
    for image_id, im in ((1, a), (2, b)):
        rgb = np.asarray(im)
        kp = extractor.extract(rgb)
        features.put_keypoints(image_id, kp)
        features.put_thumbnail(image_id, make_thumbnail(rgb, settings.thumbnail_side))
        index.upsert([ImageRow(image_id, f"{image_id}.png", im.width, im.height, 1, len(kp),
                               np.eye(4, dtype=np.float32)[0], np.zeros((0, 4), np.float32))])
    return len(Matcher(MatchConfig.from_settings(settings), index, features).match_stored([1, 2]))


def _undecided(settings: Settings, extractor: KeypointExtractor, a: Image.Image, b: Image.Image
               ) -> list[Verification]:
    """The verifications of a -> b that the keypoints alone left to the overlay check."""
    asked: list[Verification] = []
    pa, pb = (Prepared(extractor.extract(np.asarray(im))) for im in (a, b))
    found = Verifier(VerifyConfig.from_settings(settings)).verify_many(pa, [pb], lambda v: asked.append(v) or False)
    assert found == []  # without the thumbnails' yes such a pair is never a copy
    return asked


# a smooth photo (retina: 56 keypoints), mirrored under a one-line-high caption
@pytest.mark.parametrize("size", [0.04, 0.05])
def test_a_caption_over_a_smooth_photo_is_a_copy_once_the_thumbnails_agree(settings, extractor, size: float) -> None:
    photo = _sample("retina.jpg")
    copy = _overlaid_caption(ImageOps.mirror(photo), size)
    (v,) = _undecided(settings, extractor, copy, photo)
    assert v.mirrored and max(v.coverage_query, v.coverage_candidate) >= settings.overlay_min_coverage
    assert _matches(settings, extractor, copy, photo) == 1


# a textured photo and a smooth picture (a blurred gravel crop, a sky gradient, the sky above the rocket)
# in the same page: the page's frame matches unmoved and explains nearly all of the smooth post
@pytest.mark.parametrize("textured,smooth", [("rocket.jpg", "gravel_soft"), ("rocket.jpg", "gradient2"),
                                             ("hubble_deep_field.jpg", "rocket_sky"), ("gravel.png", "grass_soft")])
def test_two_posts_of_one_page_around_different_pictures_stay_apart(settings, extractor, textured: str,
                                                                    smooth: str) -> None:
    a = _web_page(_sample(textured))
    b = _web_page({**smooth_photos(), **distractors()}[smooth])
    assert len(_undecided(settings, extractor, a, b)) == 1  # the hard case: the keypoints cannot tell
    assert _matches(settings, extractor, a, b) == 0


def test_agreement_is_one_for_the_same_thumbnails_and_near_zero_where_the_picture_differs(settings) -> None:
    rng = np.random.default_rng(0)
    rgb = np.repeat(np.linspace(40, 220, 320, dtype=np.float32)[None, :, None], 240, 0).repeat(3, 2).astype(np.uint8)
    other = rgb.copy()
    other[60:180, 80:240] = rng.integers(0, 256, (120, 160, 1), dtype=np.uint8)  # a different, noisy picture there
    xy = np.array([[x, y] for x in range(90, 240, 20) for y in range(70, 180, 20)], np.float32)  # all unmatched
    frame = np.array([[10, 10], [300, 10], [10, 230], [300, 230]], np.float32)
    a = Prepared(_keypoints(np.concatenate([xy, frame]), 320, 240))
    b = Prepared(_keypoints(frame, 320, 240))
    v = Verification(0, 4, 0.1, 1.0, False, np.eye(2, 3), np.hstack([frame, frame]))
    side, radius = settings.thumbnail_side, settings.coverage_radius
    assert agreement(a, gray_of_rgb(rgb, side), b, gray_of_rgb(rgb, side), v, radius) == 1.0
    assert agreement(a, gray_of_rgb(other, side), b, gray_of_rgb(rgb, side), v, radius) < 0.05


def _keypoints(xy: np.ndarray, width: int, height: int) -> Keypoints:
    return Keypoints(xy=xy, desc=np.ones((len(xy), 128), np.uint8), width=width, height=height)
