"""Decide whether two images share content: SIFT ratio test (FAISS) + RANSAC + coverage.

Lifecycle of one query image::

    Keypoints --Prepared()--> Prepared (RootSIFT; its mirror built per query for flipped reposts)
    query Prepared + candidate Prepared list --verify_many()--> [Verification]

A pair is a copy when a similarity transform (scale, rotation, shift) explains at least
``min_inliers`` matches *and* the matched points lie near most keypoints of at least one of the
two images (``min_coverage``): one image's content is found in the other. A picture shown smaller
in the other (a collage tile, a screenshot of a post) keeps only its coarser detail, so the share
is also taken over the keypoints large enough to be seen at the pair's scale
(:func:`seen_coverage`); either share passing is enough. When the transform is
the identity between two canvases of the same size, both images must be covered
(``same_frame_min_coverage``): two different photos posted through the same app share its
frame (text, icons, even an ad photo) at exactly the same place, but not their photos, while a
re-encoded, recoloured or captioned copy matches all over. A caption or sticker drawn over the
photo itself is the exception: its own points leave the copy under that share, so such a pair is
still a copy when the other image is nearly all explained (``overlay_min_coverage``), no block of
both images is left unmatched (:func:`unmatched_block` under :data:`FRAME_HOLE`) and the inliers
spread over the picture (:func:`spread`, :data:`OVERLAY_SPREAD`); where they do not (a smooth
photo holds keypoints in one place only), the caller's ``overlay`` check decides from the
thumbnails (:mod:`memetrace.matcher.overlay`). Two posts sharing a frame leave
their photos unmatched, one such block; and when one photo is too smooth to hold keypoints (no
block is then seen), the matched points still lie on the frame alone, a small part of the picture.

A pair the same-frame rule turns down while one block of both images stays unmatched (their
photos; :func:`unmatched_block`) also shows *where* the frame is: its inliers. A frame
moved (a caption band, a pad, a crop of the post) escapes that rule, so each query's candidates
are searched for such evidence: same-size candidates it turned down (the query's frame), and
pairs of accepted candidates of the same canvas that the query holds in part at the same place,
verified against each other (their frame). A candidate is then kept only if ``min_inliers`` of
its inliers lie off those frame points: the copied photo, not the app around it, must match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

import cv2
import numpy as np

from memetrace.faiss_index import flat_l2_index
from memetrace.keypoints import SMALLEST_SIZE, Keypoints, rootsift
from memetrace.models import Box, Geometry
from memetrace.settings import Settings


class Prepared:
    """Keypoints ready for matching: their RootSIFT only. Neither the stored descriptors nor the
    mirrored copy are kept: prepared keypoints are cached by the bytes they hold
    (:class:`memetrace.byte_lru.ByteLRU`), and those two would be 1.25x more."""

    def __init__(self, kp: Keypoints) -> None:
        self.xy = kp.xy
        self.desc = rootsift(kp.desc)
        self.width, self.height = kp.width, kp.height
        # sizes not stored (an older store): every keypoint seen at any scale, as coverage was before sizes
        self.size = kp.size if kp.size is not None else np.full(len(kp.xy), np.inf, np.float32)

    def mirror(self) -> tuple[np.ndarray, np.ndarray]:
        """xy and RootSIFT of the horizontally flipped image (:meth:`Keypoints.mirrored`), built
        from the RootSIFT: the same floats, since RootSIFT is per bin but for the L1 sum, which is
        exact on the stored uint8 bins in any order."""
        m = Keypoints(xy=self.xy, desc=self.desc, width=self.width, height=self.height).mirrored()
        return m.xy, m.desc

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays (what a cache of them holds)."""
        return self.xy.nbytes + self.desc.nbytes + self.size.nbytes

    def __len__(self) -> int:
        return int(self.xy.shape[0])


@dataclass(frozen=True)
class Verification:
    candidate: int  # index into the candidate list
    inliers: int
    coverage_query: float
    coverage_candidate: float
    mirrored: bool
    # the RANSAC similarity query -> candidate (of the mirrored query when ``mirrored``), working-size pixels
    model: np.ndarray = field(default_factory=lambda: np.eye(2, 3), compare=False, repr=False)
    # K x 4 inlier pairs: query x, y (as given, never mirrored), candidate x, y; working-size pixels
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32), compare=False, repr=False)

    @property
    def kind(self) -> str:
        """full: the same picture; partial: one holds only a part of the other (a crop, a tile)."""
        return "full" if min(self.coverage_query, self.coverage_candidate) >= 0.75 else "partial"


def coverage(xy: np.ndarray, inliers_xy: np.ndarray, radius: float) -> float:
    """Share of an image's keypoints lying near a matched (inlier) point.

    "Near" = in a grid cell of side ``radius`` next to (or holding) a cell with an inlier: a
    constant-time stand-in for a distance test that is cheap enough for every candidate pair.
    """
    if len(xy) == 0 or len(inliers_xy) == 0:
        return 0.0
    cells = np.floor(xy / radius).astype(np.int64)
    hit = np.floor(inliers_xy / radius).astype(np.int64)
    shape = (int(cells[:, 1].max()) + 3, int(cells[:, 0].max()) + 3)
    grid = np.zeros(shape, np.uint8)
    hy, hx = np.clip(hit[:, 1] + 1, 0, shape[0] - 1), np.clip(hit[:, 0] + 1, 0, shape[1] - 1)
    grid[hy, hx] = 1
    grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))
    return float(grid[cells[:, 1] + 1, cells[:, 0] + 1].mean())


def seen_coverage(p: Prepared, xy: np.ndarray, inliers_xy: np.ndarray, radius: float, shrink: float,
                  min_points: int) -> float:
    """:func:`coverage` (``radius``: share of the longest side) of the keypoints of ``p`` (at ``xy``:
    its own, or their mirror) still as large as SIFT detects (:data:`SMALLEST_SIZE`) once the image
    is shown ``shrink`` times smaller; 0 when fewer than ``min_points`` are, too few to tell."""
    seen = p.size >= SMALLEST_SIZE * shrink
    if int(seen.sum()) < min_points:
        return 0.0
    return coverage(xy[seen], inliers_xy, radius * max(p.width, p.height))


def same_frame(model: np.ndarray, a: Prepared, b: Prepared, tol: float = 0.03) -> bool:
    """True when ``model`` maps a onto b unchanged: same canvas size, no scale, turn or shift."""
    scale = float(np.hypot(model[0, 0], model[1, 0]))
    return (abs(scale - 1.0) < tol and abs(float(model[1, 0])) < 0.02
            and abs(float(model[0, 2])) < tol * a.width and abs(float(model[1, 2])) < tol * a.height
            and abs(a.width - b.width) <= tol * a.width and abs(a.height - b.height) <= tol * a.height)


Overlay = Callable[[Verification], bool]


def never(v: Verification) -> bool:
    """The :data:`Overlay` check without thumbnails: the keypoints alone do not make such a pair a copy."""
    return False


@dataclass(frozen=True)
class VerifyConfig:
    """What makes a pair a copy (the module docstring says how each threshold is used; the
    settings of the same names describe them)."""

    ratio_test: float
    min_inliers: int
    ransac_reproj_px: float
    min_coverage: float
    same_frame_min_coverage: float
    overlay_min_coverage: float
    overlay_min_agreement: float  # of the thumbnails (memetrace.matcher.overlay), where an Overlay check is given
    coverage_radius: float  # share of the longest side

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(ratio_test=s.ratio_test, min_inliers=s.min_inliers, ransac_reproj_px=s.ransac_reproj_px,
                   min_coverage=s.min_coverage, same_frame_min_coverage=s.same_frame_min_coverage,
                   overlay_min_coverage=s.overlay_min_coverage, overlay_min_agreement=s.overlay_min_agreement,
                   coverage_radius=s.coverage_radius)


class Verifier:
    def __init__(self, config: VerifyConfig) -> None:
        self.config = config

    def _matches(self, dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ratio-test matches (query idx, candidate idx) from each candidate point's 2 nearest
        query points; at most one per query point (the closest)."""
        ok = dist[:, 0] < (self.config.ratio_test ** 2) * dist[:, 1]
        c_idx = np.flatnonzero(ok)
        q_idx = idx[ok, 0]
        order = np.argsort(dist[ok, 0], kind="stable")
        _, first = np.unique(q_idx[order], return_index=True)
        keep = order[first]
        return q_idx[keep], c_idx[keep]

    def _geometry(self, q_xy: np.ndarray, c_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(2x3 similarity transform query -> candidate, inlier mask), or None."""
        if len(q_xy) < self.config.min_inliers:
            return None
        model, mask = cv2.estimateAffinePartial2D(q_xy, c_xy, method=cv2.RANSAC,
                                                  ransacReprojThreshold=self.config.ransac_reproj_px,
                                                  maxIters=2000, confidence=0.995)
        if model is None or mask is None:
            return None
        scale = float(np.hypot(model[0, 0], model[1, 0]))
        if not 0.05 < scale < 20.0:
            return None
        mask = mask.ravel().astype(bool)
        return (model, mask) if mask.sum() >= self.config.min_inliers else None

    def _check(self, query: Prepared, q_xy: np.ndarray, cand: Prepared, q_idx: np.ndarray, c_idx: np.ndarray,
               index: int, mirrored: bool, overlay: Overlay = never
               ) -> tuple[Verification | None, np.ndarray | None]:
        """(the pair's verification when it is a copy; the K x 4 inlier pairs, as in
        :attr:`Verification.pairs`, when only the same-frame rule turned it down: a shared frame).
        ``overlay`` decides the unmoved pairs whose inliers lie in a small part of the picture."""
        found = self._geometry(q_xy[q_idx], cand.xy[c_idx])
        if found is None:
            return None, None
        model, mask = found
        radius = self.config.coverage_radius
        inliers_q, inliers_c = q_xy[q_idx[mask]], cand.xy[c_idx[mask]]
        cov_q = coverage(q_xy, inliers_q, radius * max(query.width, query.height))
        cov_c = coverage(cand.xy, inliers_c, radius * max(cand.width, cand.height))
        pairs = np.hstack([query.xy[q_idx[mask]], cand.xy[c_idx[mask]]]).astype(np.float32)
        if same_frame(model, query, cand):
            if min(cov_q, cov_c) < self.config.same_frame_min_coverage:
                unmatched = unmatched_block(q_xy @ model[:, :2].T + model[:, 2], cand, pairs[:, 2:],
                                            2 * radius * max(cand.width, cand.height))
                if max(cov_q, cov_c) < self.config.overlay_min_coverage or unmatched >= FRAME_HOLE:
                    return None, pairs if unmatched >= FRAME_HOLE else None
                if spread(pairs[:, 2:], cand, radius * max(cand.width, cand.height)) < OVERLAY_SPREAD:
                    v = Verification(index, int(mask.sum()), cov_q, cov_c, mirrored, model, pairs)
                    return (v if overlay(v) else None), None  # the keypoints cannot tell: the pixels may
        elif max(cov_q, cov_c) < self.config.min_coverage and \
                not self._covered_as_seen(query, q_xy, inliers_q, cand, inliers_c, model):
            return None, None
        return Verification(index, int(mask.sum()), cov_q, cov_c, mirrored, model, pairs), None

    def _covered_as_seen(self, query: Prepared, q_xy: np.ndarray, inliers_q: np.ndarray, cand: Prepared,
                         inliers_c: np.ndarray, model: np.ndarray) -> bool:
        """Whether the match explains ``min_coverage`` of the keypoints one image could show at the
        other's scale (:func:`seen_coverage`): a picture shown small (a collage tile, a screenshot
        of a post) loses its fine detail, whose points no match can explain."""
        scale = float(np.hypot(model[0, 0], model[1, 0]))  # 1 query px = scale candidate px
        radius, floor = self.config.coverage_radius, self.config.min_inliers
        return max(seen_coverage(query, q_xy, inliers_q, radius, 1.0 / scale, floor),
                   seen_coverage(cand, cand.xy, inliers_c, radius, scale, floor)) >= self.config.min_coverage

    def _search(self, q_desc: np.ndarray, candidates: Sequence[Prepared]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each candidate's ratio-test matches (query idx, candidate idx) with the query's descriptors."""
        index = flat_l2_index(q_desc.shape[1])  # on the GPU with faiss-gpu
        index.add(q_desc)
        # one search for all candidates: a big matrix product is ~2.5x faster than many small
        dist, idx = index.search(np.concatenate([c.desc for c in candidates]), 2)
        out, start = [], 0
        for c in candidates:
            out.append(self._matches(dist[start:start + len(c)], idx[start:start + len(c)]))
            start += len(c)
        return out

    def verify_many(self, query: Prepared, candidates: Sequence[Prepared], overlay: Overlay = never
                    ) -> list[Verification]:
        """The candidates that are copies of the query (tried as is, then mirrored), less those
        matched only through a frame (:meth:`_frame_only`). ``overlay``: whether an unmoved,
        same-size pair nearly all explained on one side, whose inliers lie in a small part of the
        picture, is a caption or sticker drawn over a smooth photo rather than two posts of one app
        (:mod:`memetrace.matcher.overlay` compares their thumbnails); by default it is not."""
        if len(query) < self.config.min_inliers:
            return []
        found: list[Verification] = []
        query_frame: list[np.ndarray] = []  # query points a same-size post matched unmoved, not being a copy
        pending = [i for i, c in enumerate(candidates) if len(c) >= self.config.min_inliers]
        for mirrored in (False, True):
            if not pending:
                break
            q_xy, q_desc = query.mirror() if mirrored else (query.xy, query.desc)
            failed = []
            for i, (q_idx, c_idx) in zip(pending, self._search(q_desc, [candidates[i] for i in pending])):
                v, frame = self._check(query, q_xy, candidates[i], q_idx, c_idx, i, mirrored, overlay)
                if v is None:
                    failed.append(i)
                    if frame is not None:
                        query_frame.append(frame[:, :2])
                else:
                    found.append(v)
            pending = failed
        frames = self._candidate_frames(candidates, found)
        q_frame = np.concatenate(query_frame) if query_frame else np.zeros((0, 2), np.float32)
        return sorted((v for v in found if not self._frame_only(v, q_frame, frames.get(v.candidate))),
                      key=lambda v: v.candidate)

    def _candidate_frames(self, candidates: Sequence[Prepared], found: Sequence[Verification]
                          ) -> dict[int, np.ndarray]:
        """Points of accepted candidates that lie on a frame: where two of them that the query holds
        in part, of the same canvas and at the same place in the query, match each other unmoved
        but are not copies of each other (two posts of one app sharing the query's part of it)."""
        partial = [v for v in found if v.kind == "partial"]
        frames: dict[int, list[np.ndarray]] = {}
        for k, vi in enumerate(partial):
            for vj in partial[k + 1:]:
                ci, cj = candidates[vi.candidate], candidates[vj.candidate]
                via_query = _compose(vj.model, cv2.invertAffineTransform(vi.model))  # ci -> query -> cj
                if vi.mirrored != vj.mirrored or not same_frame(via_query, ci, cj):
                    continue
                ((q_idx, c_idx),) = self._search(ci.desc, [cj])
                v, frame = self._check(ci, ci.xy, cj, q_idx, c_idx, 0, False)
                if frame is not None:
                    frames.setdefault(vi.candidate, []).append(frame[:, :2])
                    frames.setdefault(vj.candidate, []).append(frame[:, 2:])
        return {i: np.concatenate(f) for i, f in frames.items()}

    def _frame_only(self, v: Verification, query_frame: np.ndarray, cand_frame: np.ndarray | None) -> bool:
        """Whether fewer than ``min_inliers`` of the pair's inliers stay off the frames found: points
        within the RANSAC tolerance of a frame point are the frame's, not the copied content's."""
        tol = self.config.ransac_reproj_px
        on_frame = near(v.pairs[:, :2], query_frame, tol)
        if cand_frame is not None:
            on_frame |= near(v.pairs[:, 2:], cand_frame, tol)
        return int((~on_frame).sum()) < self.config.min_inliers


FRAME_HOLE = 0.1  # share of the cells both images fill that a frame pair leaves unmatched in one block
# below it, an unmoved pair with one image nearly all explained may be a captioned copy: captioned
# copies leave 0 (most) to 0.098; posts sharing a frame often more, but 0 where one post's photo
# holds no keypoints (both images fill only the frame's cells), so the hole alone cannot tell them:
# the inliers must also spread over the picture, not lie on a frame. Among the unmoved same-size
# pairs of different groups reaching this rule (dev and seeds 1, 2), the app frames hold inliers in
# <= 0.092 of the cells, whatever their hole; captioned copies of textured photos 0.13-0.5
OVERLAY_SPREAD = 0.12


def spread(xy: np.ndarray, p: Prepared, cell: float) -> float:
    """Share of the grid cells (side ``cell``) of ``p``'s frame that hold a point of ``xy``."""
    shape = (int(p.height / cell) + 1, int(p.width / cell) + 1)
    ij = np.floor(xy / cell).astype(np.int64)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < shape[1]) & (ij[:, 1] >= 0) & (ij[:, 1] < shape[0])
    return len(np.unique(ij[ok, 1] * shape[1] + ij[ok, 0])) / float(shape[0] * shape[1])


def unmatched_block(q_in_c: np.ndarray, cand: Prepared, inliers_c: np.ndarray, cell: float) -> float:
    """The largest connected block of grid cells (side ``cell``) where both images have keypoints
    but no inlier is near, as a share of the cells both fill; ``q_in_c``: the query's keypoints in
    the candidate's frame. Two posts sharing a frame leave their photos, one block, unmatched
    (0.11-0.8 on the benchmark's dev split); two copies of one picture that the same-frame rule
    turns down (a strong recolour, a sticker) leave scattered cells (0 for most, < 0.1 for 80 %)."""
    shape = (int(cand.height / cell) + 1, int(cand.width / cell) + 1)

    def cells(xy: np.ndarray) -> np.ndarray:
        grid = np.zeros(shape, np.uint8)
        ij = np.floor(xy / cell).astype(np.int64)
        ok = (ij[:, 0] >= 0) & (ij[:, 0] < shape[1]) & (ij[:, 1] >= 0) & (ij[:, 1] < shape[0])
        grid[ij[ok, 1], ij[ok, 0]] = 1
        return grid

    both = cells(q_in_c) & cells(cand.xy)
    holes = both & (1 - cv2.dilate(cells(inliers_c), np.ones((3, 3), np.uint8)))
    n, _, stats, _ = cv2.connectedComponentsWithStats(holes, connectivity=4)
    return float(stats[1:, cv2.CC_STAT_AREA].max()) / float(both.sum()) if n > 1 else 0.0


def near(xy: np.ndarray, ref: np.ndarray, radius: float) -> np.ndarray:
    """Per point of ``xy``: whether a point of ``ref`` lies within ``radius``."""
    if len(ref) == 0 or len(xy) == 0:
        return np.zeros(len(xy), bool)
    d2 = ((xy[:, None, :].astype(np.float64) - ref[None, :, :]) ** 2).sum(axis=2)
    return d2.min(axis=1) <= radius * radius


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 transform of ``inner`` then ``outer``."""
    out = outer[:, :2] @ inner
    out[:, 2] += outer[:, 2]
    return out


def geometry(v: Verification, query: Prepared, cand: Prepared, query_size: tuple[int, int],
             cand_size: tuple[int, int], pad: float) -> Geometry:
    """The shared region and transform of a verified pair, in the pixels of each file (``*_size``: w, h).

    A box is where the two frames overlap under the model. When the match holds only part of an
    image (kind partial: a crop, a collage tile) it is the inliers' extent instead, each side moved
    out to the overlap's edge when near it (``pad``: a share of the extent's longest side, like the
    coverage radius): SIFT finds no points right at a border, yet the crop reaches it."""
    model = _from_query(v.model, query.width) if v.mirrored else v.model
    inverse = cv2.invertAffineTransform(model)
    partial = v.kind == "partial"
    box_q = _box(_warp_frame(inverse, cand), query, v.pairs[:, :2] if partial else None, pad)
    box_c = _box(_warp_frame(model, query), cand, v.pairs[:, 2:] if partial else None, pad)
    fq, fc = query_size[0] / query.width, cand_size[0] / cand.width  # working size -> file, per image
    turn = -float(np.degrees(np.arctan2(v.model[1, 0], v.model[0, 0])))  # image y points down: negate
    return Geometry(_to_file(box_q, query_size, query), _to_file(box_c, cand_size, cand),
                    round(float(np.hypot(v.model[0, 0], v.model[1, 0])) * fc / fq, 4),
                    round(180.0 if turn <= -180.0 else turn, 2) + 0.0, v.mirrored, v.inliers,  # + 0.0: no -0.0
                    round(v.coverage_query, 4), round(v.coverage_candidate, 4), query_size, cand_size)


def _from_query(model: np.ndarray, width: int) -> np.ndarray:
    """``model`` (of the mirrored query) composed with the mirror: a transform of the query itself."""
    mirror = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return model @ mirror


def _warp_frame(model: np.ndarray, p: Prepared) -> np.ndarray:
    corners = np.array([[0, 0], [p.width, 0], [p.width, p.height], [0, p.height]], np.float64)
    return corners @ model[:, :2].T + model[:, 2]


def _box(warped: np.ndarray, p: Prepared, inliers_xy: np.ndarray | None, pad: float) -> np.ndarray:
    """x0, y0, x1, y1 in ``p``: the other frame's outline ``warped`` into it, held to its frame; or
    the inliers' extent, snapped to that overlap's sides within twice ``pad`` of the extent's size."""
    lo = np.maximum(warped.min(axis=0), 0.0)
    hi = np.minimum(warped.max(axis=0), np.array([p.width, p.height], np.float64))
    if inliers_xy is not None and len(inliers_xy):
        in_lo, in_hi = np.maximum(inliers_xy.min(axis=0), lo), np.minimum(inliers_xy.max(axis=0), hi)
        snap = 2 * pad * float((in_hi - in_lo).max())
        lo = np.where(in_lo - lo <= snap, lo, in_lo)
        hi = np.where(hi - in_hi <= snap, hi, in_hi)
    return np.concatenate([lo, np.maximum(hi, lo)])


def _to_file(box: np.ndarray, size: tuple[int, int], p: Prepared) -> Box:
    sx, sy = size[0] / p.width, size[1] / p.height
    x0, y0, x1, y1 = (int(round(float(v))) for v in (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
    return min(x0, size[0]), min(y0, size[1]), min(x1, size[0]), min(y1, size[1])
