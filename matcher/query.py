"""Copies of an image among the stored ones: decode → embed + SIFT → vector index → verify, or, for a
stored image, its stored vectors and keypoints → vector index → verify.

The one implementation behind ``memetrace query`` and the query API's ``POST /v1/search`` and
``GET /v1/images/{id}/copies``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from memetrace.matcher.matching import MatchConfig, Matcher, Verified
from memetrace.matcher.low_texture import sketch_of_rgb
from memetrace.matcher.overlay import gray_of_rgb
from memetrace.matcher.stored import FeaturesMissing, NotStored
from memetrace.components import Components
from memetrace.decode_budget import DecodeBudget
from memetrace.imageio import DecodedImage, DecodeLimits, decode
from memetrace.models import Geometry, ImageRecord
from memetrace.parallel import concurrently


@dataclass(frozen=True)
class Copy:
    """One stored image that shares content with the query."""

    image_id: int
    inliers: int
    kind: str  # full | partial | identical (the query's very bytes are stored)
    similarity: float  # best descriptor similarity of the Milvus candidate search
    mirrored: bool
    geometry: Geometry | None  # query (a) -> stored image (b); None: its size is no longer stored


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

        def embed() -> tuple[np.ndarray, list[np.ndarray]]:
            with self._embed_lock:
                return c.embedder.embed([image.rgb])

        # independent, each on one core (torch's threads: MEMETRACE_EMBED_THREADS), as the ingest runs them
        (glob, regions), keypoints = concurrently(embed, lambda: c.extractor.extract(image.rgb))
        # a Matcher per query: its keypoint cache would otherwise grow with every image ever shown
        found = Matcher(self.config, c.index, c.features).match_outside(
            glob[0], regions[0], keypoints, (image.width, image.height), exclude=-1, sketch=lambda: sketch_of_rgb(image.rgb),
            gray=lambda: gray_of_rgb(image.rgb, c.settings.thumbnail_side))
        return image, _copies(found, image.image_id)

    def find_stored(self, image_id: int) -> tuple[ImageRecord, list[Copy]]:
        """The copies of a stored image as the matcher finds them, best first: searched and verified with
        what is stored of it (its global and content-box vectors, its coded keypoints, its thumbnail for
        the low-texture rule), so nothing is embedded or extracted again. An upload of the same file also
        searches with its grid windows (unless MEMETRACE_STORE_GRID_REGIONS): it may find a few more
        partial copies. Raises :class:`NotStored`, :class:`FeaturesMissing`."""
        c = self.ctx
        # three independent reads, issued together
        records, keypoints, (ids, glob, regions) = concurrently(
            lambda: c.index.get([image_id]), lambda: c.features.get_keypoints(image_id),
            lambda: c.index.vectors([image_id]))
        if (record := records.get(image_id)) is None:
            raise NotStored(image_id)
        if keypoints is None:
            raise FeaturesMissing(image_id)
        if not ids:  # removed since
            raise NotStored(image_id)
        matcher = Matcher(self.config, c.index, c.features)
        found = matcher.match_outside(glob[0], regions[0], keypoints, (record.width, record.height),
                                      exclude=image_id, sketch=lambda: matcher.sketch(image_id),
                                      gray=lambda: matcher.gray(image_id))
        return record, _copies(found, -1)


def _copies(found: list[tuple[Verified, Geometry | None]], query_id: int) -> list[Copy]:
    """``match_outside``'s answers as copies, best first; ``query_id``: the query's bytes' id (its
    stored copy is ``identical``)."""
    copies = [Copy(f.candidate.image_id, f.verification.inliers,
                   "identical" if f.candidate.image_id == query_id else f.verification.kind,
                   round(f.candidate.similarity, 4), f.verification.mirrored, geo) for f, geo in found]
    return sorted(copies, key=lambda m: (-m.inliers, -m.similarity, m.image_id))


def describe_geometry(g: dict | None) -> str:
    """``  [box in the query] -> [box in the copy] x0.50 turned 90° mirrored``, from :meth:`Geometry.to_dict`."""
    if g is None:
        return ""
    turn = f" turned {g['rotation']:g}°" if abs(g["rotation"]) >= 1 else ""
    return (f"  {list(g['box_a'])} -> {list(g['box_b'])} x{g['scale']:.2f}{turn}"
            f"{' mirrored' if g['mirrored'] else ''}")
