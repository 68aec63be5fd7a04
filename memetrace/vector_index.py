"""The vector index: every stored image's global descriptor and its regional descriptors.

Written by the ingest (:meth:`VectorIndex.upsert`), searched by the matcher and the query API
(:meth:`VectorIndex.candidates_many`). Image ids derive from the content hash, so writing an
image twice upserts the same rows (idempotent re-indexing and redelivery).

Backends: ``memetrace.milvus.MilvusVectorIndex`` (Milvus Lite or a server) and
:class:`MemoryVectorIndex` (numpy brute force, for tests). Both answer the same primitive
searches; the candidate logic built on them lives here, once. :class:`ReducedVectorIndex` wraps
either to store fewer dimensions per descriptor (a shipped PCA basis, MEMETRACE_VECTOR_DIMS):
Milvus Lite keeps only float32 vectors, so fewer numbers is how its bytes per image shrink.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from memetrace.errors import ConfigError
from memetrace.models import Candidate, ImageRecord, ImageRow
from memetrace.parallel import concurrently
from memetrace.varchar import fitted

#: one search's answer per query vector: (image id, score) pairs, the nearest first
Hits = list[list[tuple[int, float]]]
#: the UTF-8 bytes each backend keeps of a string field (:func:`memetrace.varchar.fitted`)
IMAGE_BYTES = {"path": 4096}
BASES = Path(__file__).with_name("data")  # the shipped PCA bases of :class:`ReducedVectorIndex`


def now_ms() -> int:
    """Unix milliseconds: runs a second apart must tell their images apart."""
    return time.time_ns() // 1_000_000


class VectorIndex(ABC):
    """Images (a global descriptor each) and their regions; ``dim`` is the descriptor size."""

    dim: int

    @abstractmethod
    def upsert(self, rows: Sequence[ImageRow]) -> None:
        """Store (or overwrite) these images and their regions, stamped with the time (ms)."""

    @abstractmethod
    def existing(self, image_ids: Sequence[int]) -> set[int]:
        """Those of ``image_ids`` that are stored."""

    @abstractmethod
    def get(self, image_ids: Sequence[int]) -> dict[int, ImageRecord]:
        """image id -> its record, for the stored ones."""

    @abstractmethod
    def vectors(self, image_ids: Sequence[int], with_regions: bool = True
                ) -> tuple[list[int], np.ndarray, list[np.ndarray]]:
        """(ids found, global N x D, per image its R_i x D regions in index order) for stored images, in order."""

    @abstractmethod
    def count(self) -> int:
        """Number of stored images."""

    @abstractmethod
    def remove_images(self, image_ids: Sequence[int]) -> None:
        """Delete these images and their regions (ids not stored are ignored)."""

    @abstractmethod
    def stored_before(self, when: int) -> bool:
        """Whether any image was stored before ``when`` (unix milliseconds)."""

    @abstractmethod
    def ping(self, timeout_s: float) -> None:
        """Return when the backend answers within ``timeout_s``, else raise DependencyDown."""

    @abstractmethod
    def search_images(self, vectors: np.ndarray, limit: int, stored_before: int | None = None) -> Hits:
        """The ``limit`` nearest stored images of each vector (only those stored before, if given);
        no vectors, no lists."""

    @abstractmethod
    def search_regions(self, vectors: np.ndarray, limit: int) -> Hits:
        """The ``limit`` nearest stored regions of each vector, each named by its image's id."""

    def candidates(self, vector: np.ndarray, regions: np.ndarray, k: int, exclude: int) -> list[Candidate]:
        """Images most similar to a query, by its global and regional descriptors in both directions."""
        return self.candidates_many(vector[None], [regions], k, [exclude])[0]

    def candidates_many(self, vectors: np.ndarray, regions: Sequence[np.ndarray], k: int,
                        exclude: Sequence[int], regions_vs_stored_before: int | None = None) -> list[list[Candidate]]:
        """Candidates of each query, best first.

        ``regions_vs_stored_before``: when all images stored since that time are queried in the
        same run, their pairs are found by the whole-vs-regions search from the other side, so
        the query regions only need to be searched against images stored before it. One search
        per region is most of the cost (Milvus Lite spends ~1.4 ms per query vector).
        """
        n = len(vectors)
        best: list[dict[int, float]] = [{} for _ in range(n)]

        def add(query_of_row: Sequence[int], hits: Hits) -> None:
            for q, row in zip(query_of_row, hits):
                for image_id, sim in row:
                    if image_id != exclude[q] and sim > best[q].get(image_id, -1.0):
                        best[q][image_id] = sim

        limit = k + 1
        owners = [i for i, r in enumerate(regions) for _ in range(len(r))]
        since = regions_vs_stored_before
        by_regions = bool(owners) and (since is None or self.stored_before(since))
        # the searches are independent: issued together (Milvus: one round trip's wait for all); with
        # no time bound the query regions go in the same search of the stored wholes as the query wholes
        merged = by_regions and since is None
        wholes = np.concatenate([vectors, *regions]) if merged else vectors
        searches = [lambda: self.search_images(wholes, limit), lambda: self.search_regions(vectors, limit * 3)]
        if by_regions and not merged:
            searches.append(lambda: self.search_images(np.concatenate(list(regions)), limit, stored_before=since))
        hits = concurrently(*searches)
        add(range(n), hits[0][:n])
        # the query whole vs stored regions: the query was cropped from, or pasted into, them
        add(range(n), hits[1])
        # query regions vs stored wholes: a stored image is a tile or a crop of the query
        if by_regions:
            add(owners, hits[0][n:] if merged else hits[2])
        return [sorted((Candidate(i, s) for i, s in b.items()), key=lambda c: -c.similarity)[:k] for b in best]


@dataclass(frozen=True)
class _Stored:
    row: ImageRow
    indexed_at: int


class MemoryVectorIndex(VectorIndex):
    """Brute force in numpy with Milvus' scores: IP and COSINE similarity, highest first. Thread-safe."""

    def __init__(self, dim: int, metric: str = "IP") -> None:
        if metric not in ("IP", "COSINE"):
            raise ValueError(f"metric {metric!r}: expected IP or COSINE (MEMETRACE_MILVUS_METRIC)")
        self.dim = dim
        self.metric = metric
        self._images: dict[int, _Stored] = {}
        self._regions: dict[int, dict[int, np.ndarray]] = {}  # image id -> region index -> vector
        self._lock = threading.Lock()

    def upsert(self, rows: Sequence[ImageRow]) -> None:
        now = now_ms()
        with self._lock:
            for r in rows:
                self._images[r.image_id] = _Stored(fitted(r, IMAGE_BYTES), now)
                # keyed per region as in Milvus: an upsert overwrites the regions it carries
                self._regions.setdefault(r.image_id, {}).update(
                    (i, np.asarray(v, np.float32)) for i, v in enumerate(r.regions))

    def existing(self, image_ids: Sequence[int]) -> set[int]:
        with self._lock:
            return {int(i) for i in image_ids if int(i) in self._images}

    def get(self, image_ids: Sequence[int]) -> dict[int, ImageRecord]:
        with self._lock:
            found = [self._images[int(i)].row for i in image_ids if int(i) in self._images]
        return {r.image_id: ImageRecord(r.image_id, r.path, r.width, r.height, r.nbytes, r.nb_points) for r in found}

    def vectors(self, image_ids: Sequence[int], with_regions: bool = True
                ) -> tuple[list[int], np.ndarray, list[np.ndarray]]:
        empty = np.zeros((0, self.dim), np.float32)
        with self._lock:
            found = [int(i) for i in image_ids if int(i) in self._images]
            glob = [np.asarray(self._images[i].row.vector, np.float32) for i in found]
            regs = [[v for _, v in sorted(self._regions[i].items())] if with_regions else [] for i in found]
        return found, np.stack(glob) if glob else empty, [np.stack(r) if r else empty for r in regs]

    def count(self) -> int:
        with self._lock:
            return len(self._images)

    def remove_images(self, image_ids: Sequence[int]) -> None:
        with self._lock:
            for i in image_ids:
                self._images.pop(int(i), None)
                self._regions.pop(int(i), None)

    def stored_before(self, when: int) -> bool:
        with self._lock:
            return any(s.indexed_at < when for s in self._images.values())

    def ping(self, timeout_s: float) -> None:
        return None

    def search_images(self, vectors: np.ndarray, limit: int, stored_before: int | None = None) -> Hits:
        with self._lock:
            kept = [(i, s.row.vector) for i, s in self._images.items()
                    if stored_before is None or s.indexed_at < stored_before]
        return self._nearest(vectors, [i for i, _ in kept], [v for _, v in kept], limit)

    def search_regions(self, vectors: np.ndarray, limit: int) -> Hits:
        with self._lock:
            kept = [(i, v) for i, regs in self._regions.items() for v in regs.values()]
        return self._nearest(vectors, [i for i, _ in kept], [v for _, v in kept], limit)

    def _nearest(self, queries: np.ndarray, owners: list[int], stored: list[np.ndarray], limit: int) -> Hits:
        q = np.asarray(queries, np.float32).reshape(-1, self.dim)
        if not stored:
            return [[] for _ in q]
        m = np.stack([np.asarray(v, np.float32).reshape(self.dim) for v in stored])
        if self.metric == "COSINE":
            q = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-12)
            m = m / (np.linalg.norm(m, axis=1, keepdims=True) + 1e-12)
        scores = q @ m.T
        order = np.argsort(-scores, axis=1, kind="stable")
        return [[(owners[j], float(scores[r, j])) for j in order[r, :limit]] for r in range(len(q))]


def shipped_basis(model: str, dims: int) -> np.ndarray:
    """The D x ``dims`` PCA basis (orthonormal columns) shipped for ``model``'s descriptors, trained
    once on a benchmark split's global and regional descriptors (``tools/train_pq.py --pca``)."""
    path = BASES / f"pca{dims}_{model}.npy"
    if not path.is_file():
        shipped = sorted(p.name for p in BASES.glob("pca*.npy"))
        raise ConfigError(f"no {dims}-dimension basis for model {model!r} ({', '.join(shipped) or 'none'} shipped): "
                          "set MEMETRACE_VECTOR_DIMS=0 to store descriptors whole, or to a shipped size")
    return np.load(path).astype(np.float32)


class ReducedVectorIndex(VectorIndex):
    """``inner`` keeps each descriptor's projection on ``basis`` (D x d, orthonormal columns),
    renormalised, and this index answers in D dimensions: queries are projected the same way, and
    :meth:`vectors` gives the stored projections back in D (unit vectors whose inner products are
    those of the projections), so callers never see the reduced size."""

    def __init__(self, inner: VectorIndex, basis: np.ndarray) -> None:
        if inner.dim != basis.shape[1]:
            raise ConfigError(f"the vector index holds {inner.dim}-dimension descriptors, MEMETRACE_VECTOR_DIMS="
                              f"{basis.shape[1]}: set it to {inner.dim} (or 0 if they are whole), or run "
                              "`memetrace reset` and index again")
        self.inner = inner
        self.basis = basis
        self.dim = int(basis.shape[0])

    def _down(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, np.float32).reshape(-1, self.dim) @ self.basis
        return y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-12)

    def upsert(self, rows: Sequence[ImageRow]) -> None:
        self.inner.upsert([replace(r, vector=self._down(r.vector)[0], regions=self._down(r.regions)) for r in rows])

    def existing(self, image_ids: Sequence[int]) -> set[int]:
        return self.inner.existing(image_ids)

    def get(self, image_ids: Sequence[int]) -> dict[int, ImageRecord]:
        return self.inner.get(image_ids)

    def vectors(self, image_ids: Sequence[int], with_regions: bool = True
                ) -> tuple[list[int], np.ndarray, list[np.ndarray]]:
        ids, glob, regs = self.inner.vectors(image_ids, with_regions)
        return ids, glob @ self.basis.T, [r @ self.basis.T for r in regs]

    def count(self) -> int:
        return self.inner.count()

    def remove_images(self, image_ids: Sequence[int]) -> None:
        self.inner.remove_images(image_ids)

    def stored_before(self, when: int) -> bool:
        return self.inner.stored_before(when)

    def ping(self, timeout_s: float) -> None:
        self.inner.ping(timeout_s)

    def search_images(self, vectors: np.ndarray, limit: int, stored_before: int | None = None) -> Hits:
        return self.inner.search_images(self._down(vectors), limit, stored_before)

    def search_regions(self, vectors: np.ndarray, limit: int) -> Hits:
        return self.inner.search_regions(self._down(vectors), limit)


def open_index(make: Callable[[int], VectorIndex], stored: int | None, embedded: Callable[[], int],
               dims: int, model: str) -> VectorIndex:
    """The vector index as configured: ``make(d)`` opens the backend for d-dimension vectors;
    ``stored``: the size its collections already hold (None: none yet); ``embedded``: the
    embedder's size, asked only when needed; ``dims``: MEMETRACE_VECTOR_DIMS (0: whole).

    ``dims`` applies when the collections are created; stored ones keep their size (reduced when a
    basis of that size is shipped for ``model``), so a data dir of whole descriptors still opens."""
    if stored is None:
        return ReducedVectorIndex(make(dims), shipped_basis(model, dims)) if dims else make(embedded())
    if (BASES / f"pca{stored}_{model}.npy").is_file():
        return ReducedVectorIndex(make(stored), shipped_basis(model, stored))
    return make(stored)
