"""Whether an unmoved same-size pair differs only where one image carries an overlay: the pixels decide.

The same-frame rule (:mod:`memetrace.matcher.verify`) cannot tell two cases apart from keypoints
alone when one picture is smooth: a caption or sticker drawn over a smooth photo (a copy), and two
posts of one app around different photos, one of them smooth (not a copy). In both, one image is
nearly all explained, the other keeps unmatched keypoints in one place (the caption; the textured
photo), and the other image has no keypoints there. The thumbnails tell them apart: a caption's
strokes leave the photo visible between and around them, so there the two pictures still agree
pixel for pixel; a different photo agrees only by chance.

:func:`agreement` is that share: over the places of the less explained image's unmatched keypoints,
the pixels where the other thumbnail equals it up to a gain and offset (fitted on the rest of the
picture, for recoloured copies) over a whole 3 x 3 patch (a texture that merely crosses the other
picture's shade agrees at single pixels). Measured (03 Dec) on every such pair of the benchmark's
splits (dev, seeds 1 and 2: 174 pairs of posts of one app, 171 of copies) and on web pages built
from packaged photos (72 pairs of a textured and a smooth picture): posts of one app 0.00-0.30,
copies 0.35 or more for 116 of 171 (median 0.35-0.44 by split); ``overlay_min_agreement`` 0.35.
"""

from __future__ import annotations

import cv2
import numpy as np

from memetrace.imageio import make_thumbnail
from memetrace.matcher.verify import Prepared, Verification, VerifyConfig, near

TOLERANCE = 8.0  # gray levels (of 255) two blurred thumbnails of one picture stay within (JPEG, resizing)
BLUR = 1.0  # sigma, thumbnail pixels: JPEG blocks and one pixel of misregistration
ERODE = 3  # thumbnail pixels: agreement counts where a whole patch agrees, not where a texture crosses a shade
MIN_REST = 50  # thumbnail pixels outside the overlay needed to fit the gain and offset


def gray_of_jpeg(data: bytes) -> np.ndarray | None:
    """A stored JPEG thumbnail in gray, float32 (None: not decodable)."""
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return None if gray is None else gray.astype(np.float32)


def gray_of_rgb(rgb: np.ndarray, side: int) -> np.ndarray | None:
    """The gray thumbnail of an image that is not stored (an uploaded query), made as a stored one is."""
    return gray_of_jpeg(make_thumbnail(rgb, side))


def agreement(query: Prepared, q_gray: np.ndarray, cand: Prepared, c_gray: np.ndarray, v: Verification,
              radius: float) -> float | None:
    """Share of the pixels around the less explained image's unmatched keypoints where the other
    thumbnail agrees with it (None: nothing to compare); ``v``: an unmoved same-size verification of
    query -> cand, ``radius``: the coverage radius as a share of the longest side."""
    q_xy, q_in = query.xy, v.pairs[:, :2]
    if v.mirrored:  # compare as the match was made: the query flipped
        q_gray = q_gray[:, ::-1]
        q_xy, q_in = _mirrored(q_xy, query.width), _mirrored(q_in, query.width)
    if v.coverage_query <= v.coverage_candidate:
        x, x_xy, x_in, x_gray, y_gray = query, q_xy, q_in, q_gray, c_gray
    else:
        x, x_xy, x_in, x_gray, y_gray = cand, cand.xy, v.pairs[:, 2:], c_gray, q_gray
    r = radius * max(x.width, x.height)
    unmatched = x_xy[~near(x_xy, x_in, r)]
    if not len(unmatched):
        return None
    h, w = x_gray.shape
    if y_gray.shape != x_gray.shape:
        y_gray = cv2.resize(y_gray, (w, h), interpolation=cv2.INTER_AREA)
    f = w / x.width  # working-size pixels -> thumbnail pixels
    mask = np.zeros((h, w), np.uint8)
    for px, py in unmatched * f:
        cv2.circle(mask, (int(px), int(py)), max(1, round(r * f)), 1, -1)
    inside = mask.astype(bool)
    if (~inside).sum() < MIN_REST:
        return None
    a, b = (cv2.GaussianBlur(np.ascontiguousarray(g), (0, 0), BLUR) for g in (x_gray, y_gray))
    fit = np.stack([a[~inside], np.ones(int((~inside).sum()), np.float32)], 1)
    (gain, offset), *_ = np.linalg.lstsq(fit, b[~inside], rcond=None)
    agree = (np.abs(b - (gain * a + offset)) < TOLERANCE).astype(np.uint8)
    return float(cv2.erode(agree, np.ones((ERODE, ERODE), np.uint8))[inside].mean())


def is_overlay(query: Prepared, q_gray: np.ndarray | None, cand: Prepared, c_gray: np.ndarray | None,
               v: Verification, config: VerifyConfig) -> bool:
    """The :data:`~memetrace.matcher.verify.Overlay` verdict on ``v``: the thumbnails agree around the
    unmatched keypoints on at least ``config.overlay_min_agreement`` of the pixels (no thumbnail: no)."""
    if q_gray is None or c_gray is None:
        return False
    share = agreement(query, q_gray, cand, c_gray, v, config.coverage_radius)
    return share is not None and share >= config.overlay_min_agreement


def _mirrored(xy: np.ndarray, width: int) -> np.ndarray:
    out = xy.copy()
    out[:, 0] = width - 1 - out[:, 0]
    return out
