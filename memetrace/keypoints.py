"""SIFT keypoints that describe photographic content, not text or interface graphics.

Keypoints on flat-coloured patches (caption fonts, app frames, emoji, borders) are what makes
different memes look alike to a local matcher, so they are dropped at extraction: a keypoint is
kept only if less than ``flat_max`` of its surroundings is flat. A smooth photo (a sky, a soft
or dark background) has few extrema and is nearly flat by that test too: an image keeping fewer
than ``smooth_points`` is detected again at a quarter of the contrast threshold
(:data:`SMOOTH_CONTRAST`), and if it still keeps fewer, it also keeps the points whose
surroundings are not flat when only nearly constant pixels count as flat
(:data:`SMOOTH_FLAT_STD`: a caption's or a frame's background is constant after JPEG, a sky's
gentle shading is not) and hold no sharp edge (:data:`SHARP_STD`: a glyph's or a sticker's,
whose JPEG ringing is not flat either). Textured images are untouched by either step.
Coordinates and sizes are stored in the resized image's frame together with that frame's size,
descriptors as uint8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Generic, Self, TypeVar

import cv2
import numpy as np

from memetrace.settings import Settings

CONTRAST = 0.04  # SIFT's contrast threshold (OpenCV's default)
# a smooth image's: a quarter, so that a dark or misty photo has extrema at all (a dark sky: 0 -> 67)
SMOOTH_CONTRAST = 0.01
# 3 x 3 std under which a pixel is flat: JPEG noise on a flat colour stays under it
FLAT_STD = 2.0
# the same for a smooth image: a flat colour's blocks come out of JPEG constant, a sky's shading
# and grain move by about a grey level
SMOOTH_FLAT_STD = 0.5
# but JPEG rings around a caption's glyphs too: a smooth image's point with a pixel of this 3 x 3 std
# near (a graphic's sharp edge; a sky's, a blur's soft ones stay under it) is judged as before
SHARP_STD = 16.0


@dataclass(frozen=True)
class Keypoints:
    xy: np.ndarray  # N x 2 float32, pixels in a width x height frame
    desc: np.ndarray  # N x 128 uint8
    width: int
    height: int
    # N float32 SIFT sizes (patch diameter, pixels of that frame); None: not known (stored by a
    # memetrace before sizes were kept), every keypoint then counts as seen at any scale
    size: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def mirrored(self) -> "Keypoints":
        """The keypoints of the horizontally flipped image, without running SIFT again."""
        xy = self.xy.copy()
        xy[:, 0] = self.width - 1 - xy[:, 0]
        return Keypoints(xy=xy, desc=self.desc[:, MIRROR_PERMUTATION], width=self.width, height=self.height,
                         size=self.size)


def _mirror_permutation() -> np.ndarray:
    # OpenCV SIFT layout: 4 x 4 spatial cells x 8 orientation bins, in the keypoint's rotated
    # frame. A mirror flips that frame's y axis and the sense of rotation: cell row r -> 3 - r,
    # bin o -> -o mod 8 (checked against SIFT run on flipped photos, tests/test_keypoints.py).
    perm = np.empty(128, dtype=np.int64)
    for r in range(4):
        for c in range(4):
            for o in range(8):
                perm[(r * 4 + c) * 8 + o] = ((3 - r) * 4 + c) * 8 + (-o) % 8
    return perm


MIRROR_PERMUTATION = _mirror_permutation()


def rootsift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (L1-normalised, square-rooted: unit L2 norm), the form descriptors are compared in."""
    d = desc.astype(np.float32)
    d /= d.sum(axis=1, keepdims=True) + 1e-7
    return np.sqrt(d)


def resize_longest(gray: np.ndarray, max_side: int) -> np.ndarray:
    h, w = gray.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return gray
    return cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def local_variance(gray: np.ndarray) -> np.ndarray:
    """Each pixel's grey-level variance over its 3 x 3 neighbourhood."""
    g = gray.astype(np.float32)
    mean = cv2.blur(g, (3, 3))
    return cv2.blur(g * g, (3, 3)) - mean * mean


def window_share(mask: np.ndarray, xy: np.ndarray, sizes: np.ndarray, min_radius: float = 10.0) -> np.ndarray:
    """Share of the pixels set in ``mask`` around each keypoint.

    The window reaches past the keypoint's own patch (at least ``min_radius`` px) so that small
    text, whose glyphs are textured at this scale, still shows the flat background around it.
    """
    integral = cv2.integral(mask.astype(np.float64))  # (h+1) x (w+1)
    h, w = mask.shape
    r = np.maximum(min_radius, sizes * 1.5)
    x0 = np.clip(np.floor(xy[:, 0] - r), 0, w).astype(int)
    x1 = np.clip(np.ceil(xy[:, 0] + r) + 1, 0, w).astype(int)
    y0 = np.clip(np.floor(xy[:, 1] - r), 0, h).astype(int)
    y1 = np.clip(np.ceil(xy[:, 1] + r) + 1, 0, h).astype(int)
    area = np.maximum(1, (x1 - x0) * (y1 - y0))
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / area


HALF_CONTRAST_SHARE = 0.375  # of the contrast threshold, used at half size (0.015 of OpenCV's 0.04)

# The smallest patch SIFT reliably detects: OpenCV's first scale layer, 1.6 * 2^(1/3) on the image it
# doubles, is 2.0 px of the input (sub-layer refinement reaches 1.8; a tenth of the keypoints of
# benchmark photos are under 1.95). A detail shrunk below it is gone from the smaller copy.
SMALLEST_SIZE = 2.0


def _octave_up(k: cv2.KeyPoint) -> cv2.KeyPoint:
    """A keypoint found on a half-size image, in the full-size image's frame: OpenCV packs the
    octave (signed) in the low byte of ``octave``, the layer above it; pixel centres map 2x + 0.5."""
    octave = (k.octave & 255) - 256 * ((k.octave & 255) >= 128)
    return cv2.KeyPoint(k.pt[0] * 2 + 0.5, k.pt[1] * 2 + 0.5, k.size * 2, k.angle, k.response,
                        (k.octave & ~255) | ((octave + 1) & 255), k.class_id)


@dataclass(frozen=True)
class SiftConfig:
    """The settings ``sift_<field>`` describe each field (``sift_features`` for ``n_features``)."""

    n_features: int
    max_side: int
    flat_max: float
    smooth_points: int
    detect_half: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(s.sift_features, s.sift_max_side, s.sift_flat_max, s.sift_smooth_points, s.sift_detect_half)


Array = TypeVar("Array")  # numpy here, torch in memetrace.torch_sift


@dataclass(frozen=True)
class Detected(Generic[Array]):
    """SIFT's keypoints before the flat filter."""

    xy: Array  # K x 2, the frame SIFT ran on
    size: Array  # K
    response: Array  # K
    desc: Array  # K x 128 uint8


class KeypointExtractor:
    """OpenCV SIFT on the longest side resized to ``max_side``, capped at ``n_features``.

    ``detect_half``: keypoints are detected on the image at half that size and described on the
    full one. OpenCV doubles its input before building the scale space (first octave -1), so plain
    SIFT at 448 px works on an 896 px pyramid; detecting at 224 px (a 448 px pyramid) then
    computing the descriptors from the 448 px image's own octaves (no doubling: every keypoint is
    octave 0 or above there) costs about a third, and the descriptors still see the 448 px detail.
    Off by default: it missed the benchmark's floor (fewer chain copies found; precision 0.90 on
    another seed), see MEMETRACE_SIFT_DETECT_HALF.
    """

    def __init__(self, config: SiftConfig) -> None:
        self.config = config

    def select(self, var: Array, detect: Callable[[float], Detected[Array]],
               share: Callable[[Array, Detected[Array]], Array]) -> tuple[Detected[Array], Array]:
        """The keypoints found and which of them the flat filter keeps. ``var``: :func:`local_variance`
        of the image; ``detect(contrast)``: SIFT at that contrast threshold; ``share(mask, found)``:
        :func:`window_share` of a mask of ``var`` around each keypoint found."""
        found = detect(CONTRAST)
        keep = share(var < FLAT_STD * FLAT_STD, found) < self.config.flat_max
        if self._textured(keep):
            return found, keep
        found = detect(SMOOTH_CONTRAST)  # a smooth image: its weaker extrema too
        keep = share(var < FLAT_STD * FLAT_STD, found) < self.config.flat_max
        if self._textured(keep):
            return found, keep
        # still smooth: its gently shaded points too, away from any sharp edge (measured: adding them
        # to the images the weaker extrema make textured enough found fewer copies)
        gentle = (share(var < SMOOTH_FLAT_STD * SMOOTH_FLAT_STD, found) < self.config.flat_max) & (
            share(var > SHARP_STD * SHARP_STD, found) == 0)
        return found, keep | gentle

    def _textured(self, keep: Array) -> bool:
        # at most n_features are kept: an image keeping them all is textured whatever the floor
        return int(keep.sum()) >= min(self.config.smooth_points, self.config.n_features)

    def _detect_and_compute(self, gray: np.ndarray, contrast: float) -> tuple[list[cv2.KeyPoint], np.ndarray | None]:
        # ask for more than we keep: the flat filter removes a share of them
        sift = cv2.SIFT_create(nfeatures=int(self.config.n_features * 1.5), contrastThreshold=contrast)
        h, w = gray.shape
        if not self.config.detect_half or min(h, w) < 32:
            return sift.detectAndCompute(gray, None)
        half = cv2.resize(gray, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        # a quarter of the pixels holds fewer extrema: a lower contrast threshold finds about as
        # many keypoints as plain SIFT's (the strongest n_features * 1.5 are still the ones kept)
        detector = cv2.SIFT_create(nfeatures=int(self.config.n_features * 1.5), contrastThreshold=contrast * HALF_CONTRAST_SHARE)
        found = [_octave_up(k) for k in detector.detect(half, None)]
        if not found:
            return [], None
        return sift.compute(gray, found)

    def _detect(self, gray: np.ndarray, contrast: float) -> Detected[np.ndarray]:
        kps, desc = self._detect_and_compute(gray, contrast)
        return Detected(np.array([k.pt for k in kps], np.float32).reshape(-1, 2), np.array([k.size for k in kps], np.float32),
                     np.array([k.response for k in kps], np.float32),
                     np.clip(desc, 0, 255).astype(np.uint8) if kps else np.zeros((0, 128), np.uint8))

    def extract(self, rgb: np.ndarray) -> Keypoints:
        gray = resize_longest(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), self.config.max_side)
        h, w = gray.shape
        f, keep = self.select(local_variance(gray), partial(self._detect, gray),
                              lambda mask, found: window_share(mask, found.xy, found.size))
        order = np.argsort(-f.response[keep], kind="stable")[: self.config.n_features]
        idx = np.flatnonzero(keep)[order]
        return Keypoints(xy=f.xy[idx], desc=f.desc[idx], width=w, height=h, size=f.size[idx])
