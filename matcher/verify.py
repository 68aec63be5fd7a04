"""Decide whether two images share content: SIFT ratio test (FAISS) + RANSAC + coverage.

Lifecycle of one query image::

    Keypoints --Prepared()--> Prepared (RootSIFT, plus mirrored copy for flipped reposts)
    query Prepared + candidate Prepared list --verify_many()--> [Verification]

A pair is a copy when a similarity transform (scale, rotation, shift) explains at least
``min_inliers`` matches *and* the matched points lie near most keypoints of at least one of the
two images (``min_coverage``): one image's content is found in the other. When the transform is
the identity between two canvases of the same size, both images must be covered
(``same_frame_min_coverage``): two different photos posted through the same app share its
frame (text, icons, even an ad photo) at exactly the same place, but not their photos, while a
re-encoded, recoloured or captioned copy matches all over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Self

import cv2
import faiss
import numpy as np

from memetrace.keypoints import Keypoints
from memetrace.settings import Settings


class Prepared:
    """Keypoints ready for matching; the mirrored RootSIFT is computed only if asked for."""

    def __init__(self, kp: Keypoints) -> None:
        self.kp = kp
        self.xy = kp.xy
        self.desc = rootsift(kp.desc)
        self.width, self.height = kp.width, kp.height

    @cached_property
    def mirror(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.kp.mirrored()
        return m.xy, rootsift(m.desc)

    def __len__(self) -> int:
        return int(self.xy.shape[0])


@dataclass(frozen=True)
class Verification:
    candidate: int  # index into the candidate list
    inliers: int
    coverage_query: float
    coverage_candidate: float
    mirrored: bool

    @property
    def kind(self) -> str:
        """full: the same picture; partial: one holds only a part of the other (a crop, a tile)."""
        return "full" if min(self.coverage_query, self.coverage_candidate) >= 0.75 else "partial"


def rootsift(desc: np.ndarray) -> np.ndarray:
    d = desc.astype(np.float32)
    d /= d.sum(axis=1, keepdims=True) + 1e-7
    return np.sqrt(d)


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


def same_frame(model: np.ndarray, a: Prepared, b: Prepared, tol: float = 0.03) -> bool:
    """True when ``model`` maps a onto b unchanged: same canvas size, no scale, turn or shift."""
    scale = float(np.hypot(model[0, 0], model[1, 0]))
    return (abs(scale - 1.0) < tol and abs(float(model[1, 0])) < 0.02
            and abs(float(model[0, 2])) < tol * a.width and abs(float(model[1, 2])) < tol * a.height
            and abs(a.width - b.width) <= tol * a.width and abs(a.height - b.height) <= tol * a.height)


@dataclass(frozen=True)
class VerifyConfig:
    """What makes a pair a copy (the module docstring says how each threshold is used; the
    settings of the same names describe them)."""

    ratio_test: float
    min_inliers: int
    ransac_reproj_px: float
    min_coverage: float
    same_frame_min_coverage: float
    coverage_radius: float  # share of the longest side

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(ratio_test=s.ratio_test, min_inliers=s.min_inliers, ransac_reproj_px=s.ransac_reproj_px,
                   min_coverage=s.min_coverage, same_frame_min_coverage=s.same_frame_min_coverage,
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

    def _accept(self, query: Prepared, q_xy: np.ndarray, cand: Prepared, q_idx: np.ndarray,
                c_idx: np.ndarray) -> tuple[int, float, float] | None:
        """(inliers, coverage of query, coverage of candidate) when the pair is a copy."""
        found = self._geometry(q_xy[q_idx], cand.xy[c_idx])
        if found is None:
            return None
        model, mask = found
        radius = self.config.coverage_radius
        cov_q = coverage(q_xy, q_xy[q_idx[mask]], radius * max(query.width, query.height))
        cov_c = coverage(cand.xy, cand.xy[c_idx[mask]], radius * max(cand.width, cand.height))
        if same_frame(model, query, cand):
            accepted = min(cov_q, cov_c) >= self.config.same_frame_min_coverage
        else:
            accepted = max(cov_q, cov_c) >= self.config.min_coverage
        return (int(mask.sum()), cov_q, cov_c) if accepted else None

    def verify_many(self, query: Prepared, candidates: Sequence[Prepared]) -> list[Verification]:
        """The candidates that are copies of the query (tried as is, then mirrored)."""
        if len(query) < self.config.min_inliers:
            return []
        out = []
        pending = [i for i, c in enumerate(candidates) if len(c) >= self.config.min_inliers]
        for mirrored in (False, True):
            if not pending:
                break
            q_xy, q_desc = query.mirror if mirrored else (query.xy, query.desc)
            index = faiss.IndexFlatL2(q_desc.shape[1])
            index.add(q_desc)
            # one search for all candidates: a big matrix product is ~2.5x faster than many small
            dist, idx = index.search(np.concatenate([candidates[i].desc for i in pending]), 2)
            failed, start = [], 0
            for i in pending:
                n = len(candidates[i])
                q_idx, c_idx = self._matches(dist[start:start + n], idx[start:start + n])
                start += n
                result = self._accept(query, q_xy, candidates[i], q_idx, c_idx)
                if result is None:
                    failed.append(i)
                else:
                    out.append(Verification(i, *result, mirrored))
            pending = failed
        return sorted(out, key=lambda v: v.candidate)
