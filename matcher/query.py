"""Copies of an outside image among the stored ones: decode → embed + SIFT → vector index → verify.

The one implementation behind ``memetrace query`` and the query API's ``POST /v1/search``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from memetrace.matcher.matching import MatchConfig, Matcher
from memetrace.components import Components
from memetrace.decode_budget import DecodeBudget
from memetrace.imageio import DecodedImage, DecodeLimits, decode


@dataclass(frozen=True)
class Copy:
    """One stored image that shares content with the query."""

    image_id: int
    inliers: int
    kind: str  # full | partial | identical (the query's very bytes are stored)
    similarity: float  # best descriptor similarity of the Milvus candidate search
    mirrored: bool


class CopyFinder:
    """Thread-safe: concurrent API requests share one finder (and the context's one model)."""

    def __init__(self, ctx: Components) -> None:
        self.ctx = ctx
        self.config = MatchConfig.from_settings(ctx.settings)
        self.decode_limits = DecodeLimits.from_settings(ctx.settings)
        self.decode_budget = DecodeBudget.from_settings(ctx.settings)  # the process's, shared by requests
        # the embedder is not known to be thread-safe; SIFT builds its own detector per call
        self._embed_lock = threading.Lock()

    def find(self, data: bytes) -> tuple[DecodedImage, list[Copy]]:
        """Decode ``data`` (raises :class:`memetrace.imageio.BadImage`) and find its copies, best first."""
        c = self.ctx
        image = decode(data, self.decode_limits, self.decode_budget)
        with self._embed_lock:
            glob, regions = c.embedder.embed([image.rgb])
        keypoints = c.extractor.extract(image.rgb)
        # a Matcher per query: its keypoint cache would otherwise grow with every image ever shown
        found = Matcher(self.config, c.index, c.features).match_outside(glob[0], regions[0], keypoints, exclude=-1)
        copies = [Copy(cand.image_id, v.inliers,
                       "identical" if cand.image_id == image.image_id else v.kind,
                       round(cand.similarity, 4), v.mirrored) for cand, v in found]
        return image, sorted(copies, key=lambda m: (-m.inliers, -m.similarity, m.image_id))
