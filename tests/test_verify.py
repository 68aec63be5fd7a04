"""matcher.verify: copies are verified, different photos are not, shared app frames are not copies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont, ImageOps

from conftest import jpeg_roundtrip, make_settings, rgb
from memetrace.keypoints import rootsift
from memetrace.matcher.verify import (Prepared, Verification, Verifier, VerifyConfig, coverage, same_frame,
                                     seen_coverage, spread)
from memetrace.keypoints import KeypointExtractor, Keypoints, SiftConfig
from memetrace.settings import Settings

NAMES = ("astronaut", "cat", "coffee", "coins")


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("verify"))


@pytest.fixture(scope="module")
def extractor(settings: Settings) -> KeypointExtractor:
    return KeypointExtractor(SiftConfig.from_settings(settings))


@pytest.fixture(scope="module")
def prep(extractor: KeypointExtractor) -> Callable[[Image.Image], Prepared]:
    return lambda im: Prepared(extractor.extract(rgb(im)))


@pytest.fixture(scope="module")
def prep_few(settings: Settings) -> Callable[[Image.Image], Prepared]:
    """As ``prep``, without the smooth images' pass: a post whose photo keeps few keypoints (the
    retina's, shown small, keeps 25 of the post's 91 this way; that pass gives it 98)."""
    extractor = KeypointExtractor(replace(SiftConfig.from_settings(settings), smooth_points=0))
    return lambda im: Prepared(extractor.extract(rgb(im)))


@pytest.fixture(scope="module")
def verifier(settings: Settings) -> Verifier:
    return Verifier(VerifyConfig.from_settings(settings))


# ----------------------------------------------------------------------------- transforms


def _crop40(im: Image.Image) -> Image.Image:
    w, h = im.size
    cw, ch = round(w * 0.4 ** 0.5), round(h * 0.4 ** 0.5)  # 40% of the area
    x, y = (w - cw) // 3, (h - ch) // 2
    return im.crop((x, y, x + cw, y + ch))


def _rescale(im: Image.Image) -> Image.Image:
    return im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR)


def _caption(im: Image.Image) -> Image.Image:
    band = max(48, im.height // 5)
    out = Image.new("RGB", (im.width, im.height + band), "white")
    out.paste(im, (0, band))
    ImageDraw.Draw(out).text((12, band // 4), "WHEN YOU FIND THE ORIGINAL", fill="black",
                             font=ImageFont.load_default(size=band // 2))
    return out


def _rotate10(im: Image.Image) -> Image.Image:
    return im.rotate(10, resample=Image.Resampling.BICUBIC, expand=True, fillcolor="white")


def _collage(im: Image.Image, others: list[Image.Image]) -> Image.Image:
    """2x2 grid: the photo whole in one cell, a quarter of another photo in each of the others."""
    cw, gap = 300, 6
    ch = round(cw * im.height / im.width)
    cells = [im.resize((cw, ch), Image.Resampling.LANCZOS)]
    cells += [ImageOps.fit(o.crop((0, 0, o.width // 2, o.height // 2)), (cw, ch)) for o in others[:3]]
    out = Image.new("RGB", (2 * cw + 3 * gap, 2 * ch + 3 * gap), "white")
    for i, cell in enumerate(cells[::-1]):  # the photo ends up bottom right
        out.paste(cell, (gap + (i % 2) * (cw + gap), gap + (i // 2) * (ch + gap)))
    return out


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "crop40": _crop40,
    "rescale0.5": _rescale,
    "jpeg_q20": lambda im: jpeg_roundtrip(im, 20),
    "caption": _caption,
    "mirror": ImageOps.mirror,
    "rotate10": _rotate10,
}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("name", NAMES)
def test_copies_are_verified(photos: dict[str, Image.Image], prep, verifier: Verifier, name: str,
                             transform: str) -> None:
    original = prep(photos[name])
    copy = prep(TRANSFORMS[transform](photos[name]))
    (v,) = verifier.verify_many(original, [copy])
    assert v.candidate == 0 and v.inliers >= 10
    assert v.mirrored == (transform == "mirror")
    if transform == "crop40":  # the crop is all explained, the original only in part
        assert v.coverage_candidate >= 0.9 and v.coverage_query < 0.9
    # symmetric: the copy as the query finds the original too
    assert len(verifier.verify_many(copy, [original])) == 1


@pytest.mark.parametrize("name", NAMES)
def test_photo_in_a_collage_is_verified(photos: dict[str, Image.Image], prep, verifier: Verifier,
                                        name: str) -> None:
    others = [photos[n] for n in ("rocket", "hubble", "retina")]
    collage = prep(_collage(photos[name], others))
    (v,) = verifier.verify_many(prep(photos[name]), [collage])
    assert v.coverage_query >= 0.6 and not v.mirrored


def test_different_photos_are_not_verified(photos: dict[str, Image.Image], prep, verifier: Verifier) -> None:
    names = ("astronaut", "cat", "coffee", "coins", "cameraman", "rocket")
    prepared = [prep(photos[n]) for n in names]
    for i, query in enumerate(prepared):
        others = [p for j, p in enumerate(prepared) if j != i]
        assert verifier.verify_many(query, others) == [], names[i]


def test_candidate_indexes_point_into_the_list(photos: dict[str, Image.Image], prep, verifier: Verifier) -> None:
    query = prep(photos["cat"])
    cands = [prep(photos["coins"]), prep(_rescale(photos["cat"])), prep(photos["astronaut"]),
             prep(ImageOps.mirror(photos["cat"]))]
    found = verifier.verify_many(query, cands)
    assert [v.candidate for v in found] == [1, 3]
    assert [v.mirrored for v in found] == [False, True]


def test_too_few_keypoints_give_nothing(photos: dict[str, Image.Image], prep, verifier: Verifier) -> None:
    blank = prep(Image.new("RGB", (300, 200), "white"))
    assert len(blank) == 0
    assert verifier.verify_many(blank, [prep(photos["cat"])]) == []
    assert verifier.verify_many(prep(photos["cat"]), [blank]) == []


# ----------------------------------------------------------------------------- the template case


def _app_frame(photo: Image.Image, ad: Image.Image) -> Image.Image:
    """A post in a social app: header, avatars, text, the photo, and a photographic ad in a corner."""
    width, height = 520, 760
    page = Image.new("RGB", (width, height), (240, 242, 245))
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, width, 50), fill=(59, 89, 152))
    draw.text((16, 12), "photogram", fill="white", font=ImageFont.load_default(size=24))
    for i in range(3):
        draw.ellipse((16 + 50 * i, 66, 56 + 50 * i, 106), fill=(90 + 40 * i, 120, 200 - 30 * i))
    draw.text((180, 74), "@daily.pics  -  2h", fill=(30, 30, 30), font=ImageFont.load_default(size=18))
    draw.text((16, 120), "Look at this, amazing!!", fill=(20, 20, 20), font=ImageFont.load_default(size=18))
    page.paste(ImageOps.fit(photo, (360, 270)), (16, 160))  # the post's photo: same place every time
    quarter = ad.crop((0, 0, ad.width // 2, ad.height // 2)).resize((120, 120))
    page.paste(quarter, (width - 136, 160))  # the shared "ad"
    draw.text((width - 136, 284), "Sponsored", fill=(100, 100, 100), font=ImageFont.load_default(size=14))
    draw.text((16, 450), "Like 12   Comment 3   Share", fill=(100, 100, 100), font=ImageFont.load_default(size=16))
    return page


TEMPLATE_CASES = [("astronaut", "cat", "coffee"), ("coins", "cameraman", "astronaut"), ("astronaut", "coins", "cat")]


@pytest.mark.parametrize("a,b,ad", TEMPLATE_CASES)
def test_same_app_frame_is_not_a_copy(photos: dict[str, Image.Image], prep, verifier: Verifier,
                                      settings: Settings, a: str, b: str, ad: str) -> None:
    framed_a = prep(_app_frame(photos[a], photos[ad]))
    framed_b = prep(_app_frame(photos[b], photos[ad]))
    assert verifier.verify_many(framed_a, [framed_b]) == []
    assert verifier.verify_many(framed_b, [framed_a]) == []
    # each post is still found to hold its own photo
    assert len(verifier.verify_many(framed_a, [prep(photos[a])])) == 1
    assert len(verifier.verify_many(framed_b, [prep(photos[b])])) == 1
    # the case is a hard one: the shared frame alone is a geometric match at the identity, which
    # only the coverage rules turn down
    lax = Verifier(replace(VerifyConfig.from_settings(settings), same_frame_min_coverage=0.0))
    (v,) = lax.verify_many(framed_a, [framed_b])
    assert v.inliers >= settings.min_inliers and max(v.coverage_query, v.coverage_candidate) < 0.5


@pytest.mark.parametrize("a,b", [("cat", "retina"), ("coins", "retina")])
def test_same_frame_rule_stops_a_low_texture_post(photos: dict[str, Image.Image], prep_few, verifier: Verifier,
                                                  settings: Settings, a: str, b: str) -> None:
    """A post whose photo has few keypoints is mostly its frame's ad: one-sided coverage is high.

    Only the same-frame rule (both sides covered at the identity) tells these posts apart.
    """
    framed_a = prep_few(_app_frame(photos[a], photos["astronaut"]))
    framed_b = prep_few(_app_frame(photos[b], photos["astronaut"]))
    assert verifier.verify_many(framed_a, [framed_b]) == []
    assert verifier.verify_many(framed_b, [framed_a]) == []
    assert len(verifier.verify_many(framed_a, [prep_few(photos[a])])) == 1
    assert len(verifier.verify_many(framed_b, [prep_few(photos[b])])) == 1
    lax = Verifier(replace(VerifyConfig.from_settings(settings), same_frame_min_coverage=0.0))
    (v,) = lax.verify_many(framed_b, [framed_a])
    assert max(v.coverage_query, v.coverage_candidate) >= settings.min_coverage  # the one-sided rule says yes
    assert min(v.coverage_query, v.coverage_candidate) < settings.same_frame_min_coverage


def test_same_post_reencoded_is_a_copy(photos: dict[str, Image.Image], prep, verifier: Verifier) -> None:
    """The same-frame rule does not reject a real copy of a whole post (identity, covered all over)."""
    post = _app_frame(photos["cat"], photos["coffee"])
    (v,) = verifier.verify_many(prep(post), [prep(jpeg_roundtrip(post, 40))])
    assert min(v.coverage_query, v.coverage_candidate) >= 0.7 and v.kind == "full"


def _overlaid_caption(im: Image.Image, size: float) -> Image.Image:
    """Two lines of stroked text drawn over the photo itself (same canvas), ``size``: share of its height."""
    out = im.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=int(im.height * size))
    for k, line in enumerate(["WHEN THE COPY", "HAS A CAPTION ON IT"]):
        draw.text((im.width * 0.04, im.height * (0.05 + k * size * 1.1)), line, fill="white", font=font,
                  stroke_width=max(1, font.size // 12), stroke_fill="black")
    return out


# coffee 0.14: the caption hides a block of the photo (0.068 of the cells both fill, under FRAME_HOLE)
@pytest.mark.parametrize("name,size", [("cameraman", 0.1), ("coins", 0.14), ("hubble", 0.14), ("coffee", 0.14)])
def test_caption_drawn_over_the_photo_is_a_copy(photos: dict[str, Image.Image], prep, verifier: Verifier,
                                                settings: Settings, name: str, size: float) -> None:
    """The caption's points hide part of the copy (both sides are not covered, as the same-frame rule
    asks), but the original is nearly all explained, no block of both as large as a frame pair's
    photos is left unmatched and the inliers spread over the picture."""
    copy, original = prep(_overlaid_caption(photos[name], size)), prep(photos[name])
    (v,) = verifier.verify_many(copy, [original])
    assert min(v.coverage_query, v.coverage_candidate) < settings.same_frame_min_coverage
    assert max(v.coverage_query, v.coverage_candidate) >= settings.overlay_min_coverage
    (back,) = verifier.verify_many(original, [copy])
    assert back.inliers >= settings.min_inliers


# ----------------------------------------------------------------------------- unit tests


def _prepared(width: int, height: int) -> Prepared:
    return Prepared(Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), width, height))


def _similarity(scale: float = 1.0, angle_deg: float = 0.0, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def test_same_frame() -> None:
    a = _prepared(500, 700)
    assert same_frame(_similarity(), a, _prepared(500, 700))
    assert same_frame(_similarity(1.01, 0.5, 5.0, -10.0), a, _prepared(505, 690))  # within 3%
    assert not same_frame(_similarity(1.05), a, _prepared(500, 700))  # scaled
    assert not same_frame(_similarity(angle_deg=3.0), a, _prepared(500, 700))  # turned
    assert not same_frame(_similarity(tx=20.0), a, _prepared(500, 700))  # shifted 4% of the width
    assert not same_frame(_similarity(ty=-25.0), a, _prepared(500, 700))  # shifted 3.6% of the height
    assert not same_frame(_similarity(), a, _prepared(500, 760))  # another canvas size
    assert not same_frame(_similarity(), a, _prepared(400, 700))
    assert not same_frame(_similarity(0.5), a, _prepared(250, 350))  # a rescaled copy is not the frame


def test_spread_hand_computed() -> None:
    frame = _prepared(100, 50)  # cells of 20 px: 6 x 3 grid (the last row and column partly outside)
    xy = np.array([[1, 1], [5, 5], [25, 1], [99, 49], [-3, 4]], np.float32)  # 3 cells; one point outside
    assert spread(xy, frame, 20.0) == pytest.approx(3 / 18)


def test_coverage_hand_computed() -> None:
    xy = np.array([[5, 5], [15, 15], [35, 35], [45, 5]], np.float64)
    # one inlier at (25, 25) with radius 10: cell (2, 2); cells (1, 1) and (3, 3) are next to it,
    # (0, 0) and (4, 0) are two cells away
    assert coverage(xy, np.array([[25.0, 25.0]]), 10.0) == pytest.approx(0.5)
    # a smaller radius: (25, 25) is cell (5, 5); (15, 15) -> (3, 3) and (35, 35) -> (7, 7) are too far
    assert coverage(xy, np.array([[25.0, 25.0]]), 5.0) == pytest.approx(0.0)
    # every keypoint an inlier: all covered
    assert coverage(xy, xy, 1.0) == pytest.approx(1.0)
    # inliers at (5, 5) and (45, 5), radius 10: cells (0, 0) and (4, 0) cover (0, 0), (1, 1), (4, 0)
    assert coverage(xy, xy[[0, 3]], 10.0) == pytest.approx(0.75)
    # nothing to cover, or nothing matched
    assert coverage(np.zeros((0, 2)), xy, 10.0) == 0.0
    assert coverage(xy, np.zeros((0, 2)), 10.0) == 0.0


def test_coverage_handles_negative_coordinates() -> None:
    # mirrored keypoints can sit at x = width - 1 - x > -1
    xy = np.array([[-0.4, 3.0], [30.0, 30.0]])
    assert coverage(xy, xy[:1], 10.0) == pytest.approx(0.5)


def test_seen_coverage_hand_computed() -> None:
    xy = np.array([[5, 5], [15, 15], [35, 35], [45, 5]], np.float32)
    p = Prepared(Keypoints(xy, np.ones((4, 128), np.uint8), 200, 100, np.array([2.0, 2.5, 9.0, 12.0], np.float32)))
    inlier = np.array([[25.0, 25.0]])  # cells of 200 x 0.05 = 10 px: covers (15, 15) and (35, 35)
    assert seen_coverage(p, xy, inlier, 0.05, 1.0, 1) == pytest.approx(0.5)
    # shown 4x smaller: only sizes >= 8 are still seen, (35, 35) covered, (45, 5) not
    assert seen_coverage(p, xy, inlier, 0.05, 4.0, 1) == pytest.approx(0.5)
    assert seen_coverage(p, xy, inlier, 0.05, 4.0, 3) == 0.0  # 2 seen: too few to tell
    assert seen_coverage(p, xy, inlier, 0.05, 5.5, 1) == 0.0  # (45, 5) alone is seen, not covered
    blind = Prepared(Keypoints(xy, np.ones((4, 128), np.uint8), 200, 100))  # sizes not stored
    assert seen_coverage(blind, xy, inlier, 0.05, 100.0, 4) == pytest.approx(0.5)


def _shown_small(rng: np.random.Generator, sizes: bool) -> tuple[Prepared, Prepared]:
    """A query whose fine detail (160 small keypoints all over it) is lost in a candidate that shows
    it at 0.3 scale beside 300 keypoints of its own: only its 40 coarse keypoints, in one corner
    of it, are in both."""
    fine, coarse = rng.random((160, 2)) * 440 + 4, rng.random((40, 2)) * 200 + 20
    q_xy = np.vstack([fine, coarse]).astype(np.float32)
    q_size = np.concatenate([rng.uniform(2.0, 3.0, 160), rng.uniform(8.0, 14.0, 40)]).astype(np.float32)
    q_desc = rng.integers(0, 256, (200, 128)).astype(np.uint8)
    own = rng.random((300, 2)) * 440 + 4
    c_xy = np.vstack([coarse * 0.3 + (300.0, 20.0), own]).astype(np.float32)
    c_desc = np.vstack([q_desc[160:], rng.integers(0, 256, (300, 128))]).astype(np.uint8)
    c_size = np.concatenate([q_size[160:] * 0.3, rng.uniform(2.0, 6.0, 300)]).astype(np.float32)
    query = Keypoints(q_xy, q_desc, 448, 448, q_size if sizes else None)
    cand = Keypoints(c_xy, c_desc, 448, 448, c_size if sizes else None)
    return Prepared(query), Prepared(cand)


def test_a_picture_shown_small_is_covered_by_the_keypoints_it_can_show(verifier: Verifier) -> None:
    """Its fine detail is no evidence against the pair; without sizes (an older store) neither
    share reaches min_coverage, as before sizes were kept."""
    query, cand = _shown_small(np.random.default_rng(3), sizes=True)
    (v,) = verifier.verify_many(query, [cand])
    assert v.inliers == 40 and max(v.coverage_query, v.coverage_candidate) < verifier.config.min_coverage
    blind_query, blind_cand = _shown_small(np.random.default_rng(3), sizes=False)
    assert verifier.verify_many(blind_query, [blind_cand]) == []


def test_verification_kind() -> None:
    assert Verification(0, 50, 0.9, 0.8, False).kind == "full"
    assert Verification(0, 50, 0.3, 0.95, False).kind == "partial"
    assert Verification(0, 50, 0.75, 0.75, True).kind == "full"
    assert Verification(0, 50, 0.6, 0.9, False).kind == "partial"  # a 40 % crop: most, not all


def test_rootsift_is_unit_norm() -> None:
    desc = np.random.default_rng(0).integers(0, 255, (20, 128)).astype(np.uint8)
    r = rootsift(desc)
    assert r.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-4)
    assert rootsift(np.zeros((1, 128), np.uint8)).sum() == 0.0


# ----------------------------------------------------------------------------- frames seen among the candidates


@pytest.fixture(scope="module")
def posts(photos: dict[str, Image.Image]) -> dict[str, Image.Image]:
    """Posts of one app, the same ad in each; ``retina``'s smooth photo leaves mostly the frame's points (``prep_few``)."""
    return {n: _app_frame(photos[n], photos["astronaut"]) for n in ("retina", "coffee", "coins", "cat")}


def test_a_shifted_post_is_not_a_copy_of_other_posts_through_their_frame(posts: dict[str, Image.Image], prep_few,
                                                                         prep, verifier: Verifier) -> None:
    """A caption band moves the whole post: the same-frame rule does not apply, and the frame alone
    covers most of a low-texture post. Two other posts of the app among the candidates show what
    the frame is (they match each other unmoved but are no copies), so only the own post is kept."""
    captioned = prep_few(_caption(posts["retina"]))
    others = [prep_few(posts["coffee"]), prep_few(posts["coins"])]
    # alone, each other post passes as a copy: only the frame seen among the candidates stops it
    assert all(len(verifier.verify_many(captioned, [o])) == 1 for o in others)
    found = verifier.verify_many(captioned, [prep_few(posts["retina"]), *others])
    assert [v.candidate for v in found] == [0]
    assert verifier.verify_many(captioned, others) == []
    # with the shipped extraction the smooth photo keeps points of its own: still only its own post
    shipped = [prep(posts["retina"]), prep(posts["coffee"]), prep(posts["coins"])]
    assert [v.candidate for v in verifier.verify_many(prep(_caption(posts["retina"])), shipped)] == [0]


def test_the_query_frame_is_found_from_a_same_size_post(posts: dict[str, Image.Image], prep_few,
                                                        verifier: Verifier) -> None:
    """A same-size post the same-frame rule turns down marks the query's frame points: a shifted
    other post matching the query through them only is no copy either."""
    query = prep_few(posts["retina"])
    shifted = prep_few(_caption(posts["coins"]))
    assert len(verifier.verify_many(query, [shifted])) == 1  # alone: the frame passes
    assert verifier.verify_many(query, [prep_few(posts["coffee"]), shifted]) == []
    # the query's own photo, captioned, is still found next to the same evidence
    found = verifier.verify_many(query, [prep_few(posts["coffee"]), shifted, prep_few(_caption(posts["retina"]))])
    assert [v.candidate for v in found] == [2]


def test_one_photo_in_posts_of_one_app_still_matches(photos: dict[str, Image.Image], posts: dict[str, Image.Image],
                                                     prep, verifier: Verifier) -> None:
    """Two posts of the same photo are copies of each other, so they show no frame: the photo finds
    both, and a screenshot of it finds the photo next to other posts of the app."""
    again = _app_frame(photos["cat"], photos["coffee"])  # the same photo, another ad
    found = verifier.verify_many(prep(photos["cat"]), [prep(posts["cat"]), prep(again), prep(posts["coins"])])
    assert [v.candidate for v in found] == [0, 1]
    found = verifier.verify_many(prep(_caption(posts["cat"])), [prep(posts["coffee"]), prep(photos["cat"]),
                                                                prep(posts["coins"]), prep(posts["cat"])])
    assert [v.candidate for v in found] == [1, 3]


def test_the_mirror_built_from_rootsift_is_that_of_the_mirrored_keypoints(extractor: KeypointExtractor,
                                                                          photos: dict[str, Image.Image]) -> None:
    """Prepared keeps no stored descriptors: its mirror, built from its RootSIFT, must be the very
    floats the stored keypoints' mirror gives (the L1 sum of uint8 bins is exact in any order)."""
    for name in NAMES:
        kp = extractor.extract(rgb(photos[name]))
        xy, desc = Prepared(kp).mirror()
        m = kp.mirrored()
        assert np.array_equal(xy, m.xy) and np.array_equal(desc, rootsift(m.desc)), name
        # float32 RootSIFT, the xy and the sizes, nothing more
        assert Prepared(kp).nbytes == kp.xy.nbytes + 4 * kp.desc.size + 4 * len(kp), name
