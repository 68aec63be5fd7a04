"""Copies of images too smooth for local verification: a stricter whole-image rule.

The flat-patch filter (:mod:`memetrace.keypoints`) leaves a sky, a wall or a studio shot with a
handful of keypoints; its smooth-image pass (SIFT again at a lower contrast threshold, the gently
shaded points kept) gives most such photos enough, but the smoothest keep too few for RANSAC to
verify even an exact rescale. When either side of a
candidate pair has fewer than ``min_points`` keypoints and local verification said no, the pair is
a copy only when both whole-image views agree strictly:

- the global descriptors' cosine similarity is at least ``min_similarity``, and
- the stored thumbnails line up: a centre part of one, tried at a few sizes (a light crop
  enlarges the rest), is found in the other with a normalized correlation of at least
  ``min_agreement`` on the picture *and* on its detail (a band-pass of it). The detail is
  what tells two skies or two gradients apart: their smooth shading correlates, their clouds,
  edges and grain do not. A featureless gradient has no detail and is never linked this way.
  The query's thumbnail is also tried mirrored (flipped reposts).
The thresholds were set on packaged smooth photos, their copies and smooth distractors
(:mod:`benchmarks.low_texture`: copies score 0.85-1.0, different pictures 0.61 at most) and on
the benchmark's dev split (different photos with a side under 50 points: 0.58 at most). Textured
different photos can score 0.97 there: the rule is only sound behind the keypoint floor.

Such a match has 0 inliers (nothing was verified locally) and a model read from the thumbnail
alignment, so its geometry (boxes, scale) is that of the alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import cv2
import numpy as np

from memetrace.matcher.verify import Prepared, Verification
from memetrace.settings import Settings

SIDE = 64  # thumbnail side compared: smooth pictures hold little above it, and 64 px is cheap
CENTRE = 0.8  # share of each side of the searched part: room for a light crop's shift
SIZES = (1.0, 0.93, 0.86, 0.8, 0.74)  # content sizes tried: a crop keeping >= ~75 % of a side
MIN_DETAIL = 0.8  # std of the detail at SIDE: gradients stay below 0.45, the smoothest photos above 1.2


@dataclass(frozen=True)
class LowTextureConfig:
    """The settings of the same names (``low_texture_*``) describe each threshold."""

    min_points: int
    min_similarity: float
    min_agreement: float

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(s.low_texture_points, s.low_texture_min_similarity, s.low_texture_min_agreement)

    def applies(self, a: Prepared, b: Prepared) -> bool:
        """Whether local verification cannot decide for this pair (too few points on a side)."""
        return min(len(a), len(b)) < self.min_points


def sketch_of_rgb(rgb: np.ndarray) -> np.ndarray:
    """The gray picture compared, longest side :data:`SIDE`, float32."""
    return sketch_of_gray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def sketch_of_gray(gray: np.ndarray) -> np.ndarray:
    """:func:`sketch_of_rgb` of a gray picture (a stored thumbnail,
    :func:`memetrace.matcher.overlay.gray_of_jpeg`)."""
    h, w = gray.shape
    f = SIDE / max(h, w)
    size = (max(8, round(w * f)), max(8, round(h * f)))
    return cv2.resize(gray.astype(np.float32), size, interpolation=cv2.INTER_AREA)


def _detail(x: np.ndarray) -> np.ndarray:
    """Band-pass (Laplacian of the lightly smoothed picture): ~0 on shading and linear gradients."""
    return cv2.Laplacian(cv2.GaussianBlur(x, (0, 0), 1.0), cv2.CV_32F, ksize=3)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 1e-6 else 0.0


def _find(part_of: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Best (score, 2x3 model part_of sketch -> target sketch pixels) over :data:`SIZES`."""
    best, model = -1.0, np.eye(2, 3)
    h0, w0 = part_of.shape
    target_detail = _detail(target)
    for size in SIZES:
        x = cv2.resize(part_of, (max(8, round(w0 * size)), max(8, round(h0 * size))), interpolation=cv2.INTER_AREA)
        h, w = x.shape
        ch, cw = min(round(h * CENTRE), target.shape[0]), min(round(w * CENTRE), target.shape[1])
        oy, ox = (h - ch) // 2, (w - cw) // 2
        part, part_detail = x[oy:oy + ch, ox:ox + cw], _detail(x)[oy:oy + ch, ox:ox + cw]
        if part_detail.std() < MIN_DETAIL:
            continue
        scores = cv2.matchTemplate(target, part, cv2.TM_CCOEFF_NORMED)
        _, plain, _, (lx, ly) = cv2.minMaxLoc(scores)
        score = min(plain, _ncc(part_detail, target_detail[ly:ly + ch, lx:lx + cw]))
        if score > best:
            f = x.shape[1] / w0
            best, model = score, np.array([[f, 0.0, lx - ox], [0.0, f, ly - oy]])
    return best, model


def _frame_scale(p: Prepared, s: np.ndarray) -> float:
    return s.shape[1] / p.width  # working-size pixels -> sketch pixels


def _covered(model: np.ndarray, a: Prepared, b: Prepared) -> float:
    """Share of a's frame that ``model`` (a -> b) puts inside b's frame."""
    f, tx, ty = model[0, 0], model[0, 2], model[1, 2]
    x0, x1 = np.clip([tx, tx + f * a.width], 0, b.width)
    y0, y1 = np.clip([ty, ty + f * a.height], 0, b.height)
    return float((x1 - x0) * (y1 - y0) / (f * f * a.width * a.height))


def agreement(query: Prepared, q_sketch: np.ndarray, cand: Prepared, c_sketch: np.ndarray
              ) -> tuple[float, np.ndarray]:
    """(score, similarity model query -> candidate in working-size pixels): each thumbnail's centre
    searched in the other, the better direction kept."""
    sq, sc = _frame_scale(query, q_sketch), _frame_scale(cand, c_sketch)
    fwd, m = _find(q_sketch, c_sketch)
    back, n = _find(c_sketch, q_sketch)
    if fwd >= back:  # q working -> q sketch -> c sketch -> c working
        f, tx, ty = m[0, 0] * sq / sc, m[0, 2] / sc, m[1, 2] / sc
    else:  # the inverse of c working -> c sketch -> q sketch -> q working
        g = n[0, 0] * sc / sq
        f, tx, ty = 1.0 / g, -n[0, 2] / sq / g, -n[1, 2] / sq / g
    return max(fwd, back), np.array([[f, 0.0, tx], [0.0, f, ty]])


def decide(config: LowTextureConfig, index: int, similarity: float, query: Prepared, q_sketch: np.ndarray | None,
           cand: Prepared, c_sketch: np.ndarray | None) -> Verification | None:
    """The whole-image verdict on a pair :meth:`LowTextureConfig.applies` to (``similarity``: the
    global descriptors' cosine), as a :class:`Verification` of candidate ``index`` with 0 inliers."""
    if similarity < config.min_similarity or q_sketch is None or c_sketch is None:
        return None
    # as is, then mirrored (a flipped repost): the model is then that of the mirrored query, as RANSAC's
    tries = [(agreement(query, s, cand, c_sketch), m) for m, s in ((False, q_sketch), (True, q_sketch[:, ::-1].copy()))]
    (score, model), mirrored = max(tries, key=lambda found: found[0][0])
    if score < config.min_agreement:
        return None
    inverse = cv2.invertAffineTransform(model)
    return Verification(index, 0, _covered(model, query, cand), _covered(inverse, cand, query), mirrored, model)
