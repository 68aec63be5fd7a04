"""Keypoints as compact bytes: 16-bit coordinates and product-quantized RootSIFT descriptors.

A stored keypoint takes ``5 + M`` bytes instead of 140 (float32 x, y, size and a 128-byte descriptor):

- x, y: uint16 fixed point over the frame's longest side (1/146 px at 448 px);
- size: one byte, 32 steps per octave (``round(32 log2 size)``, 2 % apart, up to 246 px; 255: not
  known). Format 1 had no sizes: its keypoints decode with ``size`` None;
- descriptor (``pq``): its RootSIFT (the form the matcher compares) cut into ``M`` sub-vectors,
  each stored as the byte naming the nearest of 256 centroids of a codebook shipped with the
  package (``memetrace/data/``, trained once on SIFT of a benchmark split's images, see
  ``tools/train_pq.py``); ``raw``: the 128 bytes as they are (lossless, 4x larger).

Decoding gives back :class:`~memetrace.keypoints.Keypoints` with uint8 SIFT-like descriptors
(the squared centroids, at OpenCV's scale), so the matcher and the mirror permutation work on
them unchanged. A blob starts with a magic, the format version and the descriptor coding: one
of another version or coding is refused with one line naming the object.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

import numpy as np

from memetrace.keypoints import Keypoints, rootsift
from memetrace.sqlite_file import IncompatibleFile

if TYPE_CHECKING:
    from memetrace.settings import Settings

MAGIC = b"MKP"
VERSION = 2
READS = (1, 2)  # format 1: no sizes
CODINGS = ("raw", "pq16")
_HEADER = struct.Struct("<3sBBIHH")  # magic, version, coding, n, width, height
SIFT_L1 = 3000.0  # typical L1 norm of an OpenCV SIFT descriptor (L2 norm 512): the decoded scale
DATA = Path(__file__).with_name("data")
SIZE_STEPS = 32.0  # size codes per octave
SIZE_UNKNOWN = 255


class KeypointFormatError(IncompatibleFile):
    """Stored keypoints this codec cannot read; the message is one line naming the object (the CLI
    prints it so, like any store of another format)."""


@cache
def codebook(coding: str) -> np.ndarray:
    """M x 256 x (128 / M) float32 centroids of a ``pq<M>`` coding."""
    return np.load(DATA / f"{coding}_rootsift.npy").astype(np.float32)


def pq_encode(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """N x M uint8: per sub-vector, the nearest centroid (squared L2)."""
    m, _, sub = centroids.shape
    parts = vectors.reshape(len(vectors), m, sub)
    codes = np.empty((len(vectors), m), np.uint8)
    for j in range(m):
        c = centroids[j]
        dist = (c * c).sum(axis=1)[None, :] - 2.0 * parts[:, j] @ c.T  # |x|^2 is the same for all
        codes[:, j] = dist.argmin(axis=1)
    return codes


def pq_decode(codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    m, _, sub = centroids.shape
    if not len(codes):
        return np.zeros((0, m * sub), np.float32)
    return np.concatenate([centroids[j][codes[:, j]] for j in range(m)], axis=1)


def size_encode(size: np.ndarray | None, n: int) -> np.ndarray:
    if size is None:
        return np.full(n, SIZE_UNKNOWN, np.uint8)
    code = np.round(np.log2(np.maximum(np.asarray(size, np.float64), 1.0)) * SIZE_STEPS)
    return np.clip(code, 0, SIZE_UNKNOWN - 1).astype(np.uint8)


def size_decode(codes: np.ndarray) -> np.ndarray | None:
    if len(codes) and (codes == SIZE_UNKNOWN).all():
        return None
    size = np.exp2(codes.astype(np.float32) / np.float32(SIZE_STEPS))
    return np.where(codes == SIZE_UNKNOWN, np.float32(np.inf), size).astype(np.float32)


def _to_sift(root: np.ndarray) -> np.ndarray:
    """uint8 descriptors whose RootSIFT is (about) ``root``."""
    d = np.maximum(root, 0.0) ** 2
    d /= d.sum(axis=1, keepdims=True) + 1e-7
    return np.clip(np.round(d * SIFT_L1), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class KeypointCodec:
    """``coding``: how descriptors are written, ``pq16`` (21 bytes a keypoint with its x, y, size) or
    ``raw`` (133 bytes, lossless); reading takes any coding."""

    coding: Literal["raw", "pq16"] = "raw"

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(s.keypoint_coding)

    def encode(self, kp: Keypoints) -> bytes:
        n = len(kp)
        side = max(kp.width, kp.height, 1)
        xy = np.clip(np.round(np.asarray(kp.xy, np.float64) * (65535.0 / side)), 0, 65535).astype("<u2")
        desc = np.asarray(kp.desc)
        if self.coding == "raw":
            body = np.clip(desc, 0, 255).astype(np.uint8)
        else:
            body = pq_encode(rootsift(desc), codebook(self.coding))
        return _HEADER.pack(MAGIC, VERSION, CODINGS.index(self.coding), n, kp.width, kp.height) + \
            xy.tobytes() + size_encode(kp.size, n).tobytes() + body.tobytes()

    def decode(self, data: bytes, name: str = "keypoints") -> Keypoints:
        """Any coding this version knows, whatever ``coding`` writes; ``name``: for the error."""
        if len(data) < _HEADER.size or data[:3] != MAGIC:
            raise KeypointFormatError(f"{name}: not keypoints of this memetrace (an older format?); "
                                      "delete the feature store and run `memetrace index` again")
        magic, version, coding, n, w, h = _HEADER.unpack_from(data)
        if version not in READS or coding >= len(CODINGS):
            raise KeypointFormatError(f"{name}: keypoint format {version}.{coding}, this memetrace reads formats "
                                      f"{READS[0]}-{READS[-1]}, codings 0-{len(CODINGS) - 1}; run the memetrace "
                                      "that wrote it, or index again")
        side = max(w, h, 1)
        at = _HEADER.size
        xy = np.frombuffer(data, "<u2", 2 * n, at).reshape(n, 2).astype(np.float32) * np.float32(side / 65535.0)
        at += 4 * n
        size = None
        if version >= 2:
            size = size_decode(np.frombuffer(data, np.uint8, n, at))
            at += n
        name_of = CODINGS[coding]
        if name_of == "raw":
            desc = np.frombuffer(data, np.uint8, 128 * n, at).reshape(n, 128).copy()
        else:
            book = codebook(name_of)
            codes = np.frombuffer(data, np.uint8, book.shape[0] * n, at).reshape(n, book.shape[0])
            desc = _to_sift(pq_decode(codes, book))
        return Keypoints(xy=xy, desc=desc, width=w, height=h, size=size)
