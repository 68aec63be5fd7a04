"""The indexer: inputs -> decoded images -> descriptors + keypoints -> feature store + vector index.

For each chunk of inputs::

    prepare: read + decode + content boxes + SIFT + thumbnail + CNN inputs    (thread pool, overlaps
             the previous chunk's embedding; keeps no decoded pixels, only what embedding reads)
    -> which images the vector index has already (same bytes = same id)   [dependency read]
    -> embed the others, once each (batched, GPU when present)              (pure compute)
    -> feature store (keypoints, thumbnail), then vector index (vectors)    [dependency writes]
    -> one outcome per input: Stored(image id, keypoints, new) or Unindexable(reason)

Dependency calls go through ``call``: the streaming worker passes its retry with backoff, the batch
pipeline calls once. A retry repeats that one call, never the decoding or the embedding: the writes
are upserts keyed by the content hash, so repeating them is harmless. Features are written before
vectors, so an image the vector index has also has its keypoints. What the outcomes mean (catalog
rows, Kafka events) is the caller's business: the indexer writes no record of its own.

Memory: a prepared image holds its CNN inputs (``image_size``² and up to three ``box_image_size``²
RGB crops), keypoints and thumbnail, under 1 MB whatever the input's size; at most
``(lookahead + 1) x chunk_size`` of them wait, and the decoding itself is bounded by the process's
decode budget (:class:`memetrace.decode_budget.DecodeBudget`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol, Self

import numpy as np

from memetrace.decode_budget import DecodeBudget
from memetrace.embedder import EmbedInput
from memetrace.errors import Call, call_once
from memetrace.feature_store import FeatureStore
from memetrace.imageio import BadImage, DecodeLimits, decode, make_thumbnail
from memetrace.ingest.sources import InputItem
from memetrace.keypoints import KeypointExtractor, Keypoints
from memetrace.models import ImageRow
from memetrace.settings import Settings
from memetrace.vector_index import VectorIndex

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class IndexConfig:
    decode: DecodeLimits
    thumbnail_side: int
    chunk_size: int  # inputs embedded and written together
    prepare_threads: int
    lookahead: int = 2  # chunks prepared while one is embedded: both busy, few images held
    store_grid: bool = False  # the grid windows' regional descriptors too, not only the content boxes'

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(DecodeLimits.from_settings(s), s.thumbnail_side, max(8, s.batch_size), s.prepare_threads,
                   store_grid=s.store_grid_regions)


def _ignore(seconds: float) -> None:
    """An observer callback that observes nothing."""


@dataclass(frozen=True)
class IndexObserver:
    """Where the indexer reports how long its steps took, in seconds (default: nowhere)."""

    decode_seconds: Callable[[float], None] = _ignore  # per image decoded: read, decode, thumbnail, CNN inputs
    sift_seconds: Callable[[float], None] = _ignore  # per image
    embed_seconds: Callable[[float], None] = _ignore  # per chunk of new images
    write_seconds: Callable[[float], None] = _ignore  # per vector-index upsert, failed attempts included


class ImageEmbedder(Protocol):
    """What the indexer needs of :class:`memetrace.embedder.Embedder`."""

    def inputs(self, rgb: np.ndarray) -> EmbedInput: ...

    def embed_inputs(self, inputs: Sequence[EmbedInput], grid: bool = True) -> tuple[np.ndarray, list[np.ndarray]]: ...


@dataclass(frozen=True)
class PreparedImage:
    """One decoded input, reduced to what embedding and storing need (no decoded pixels)."""

    key: str
    image_id: int
    width: int  # of the original image
    height: int
    nbytes: int
    keypoints: Keypoints
    thumbnail: bytes
    cnn: EmbedInput


@dataclass(frozen=True)
class Stored:
    """An input whose image is in the feature store and the vector index."""

    key: str
    image_id: int
    nb_points: int
    new: bool  # not stored before this call, nor by an earlier input of it (same bytes)


@dataclass(frozen=True)
class Unindexable:
    """An input that is not an indexable image; ``reason`` as :class:`memetrace.imageio.BadImage`'s."""

    key: str
    reason: str
    detail: str


Outcome = Stored | Unindexable


@dataclass(frozen=True)
class Embedded:
    """One chunk computed: an outcome per input, and the rows of its new images still to write."""

    outcomes: list[Outcome]
    fresh: list[PreparedImage]
    rows: list[ImageRow]


@dataclass
class IndexReport:
    """Counts over outcomes (the batch run's summary)."""

    seen: int = 0
    new_images: int = 0
    duplicates: int = 0
    bad: dict[str, int] = field(default_factory=dict)

    def add(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            self.seen += 1
            if isinstance(o, Unindexable):
                self.bad[o.reason] = self.bad.get(o.reason, 0) + 1
            elif o.new:
                self.new_images += 1
            else:
                self.duplicates += 1


def _chunks(items: Iterable[InputItem], size: int) -> Iterator[list[InputItem]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class Indexer:
    """Stores images in ``features`` and ``vectors``; see the module docstring."""

    def __init__(self, config: IndexConfig, embedder: ImageEmbedder, extractor: KeypointExtractor,
                 vectors: VectorIndex, features: FeatureStore, observer: IndexObserver = IndexObserver(),
                 decode_budget: DecodeBudget | None = None) -> None:
        """``decode_budget``: the process's bound on pixels decoded at once (None: unbounded)."""
        self.config = config
        self.embedder = embedder
        self.extractor = extractor
        self.vectors = vectors
        self.features = features
        self.observer = observer
        self.decode_budget = decode_budget

    def index(self, items: Iterable[InputItem], call: Call = call_once) -> Iterator[list[Outcome]]:
        """Index ``items``; yields each chunk's outcomes (in input order) once the chunk is stored."""
        pending: deque[list[Future[PreparedImage | Unindexable]]] = deque()
        with ThreadPoolExecutor(self.config.prepare_threads) as pool:
            for chunk in _chunks(items, self.config.chunk_size):
                pending.append([pool.submit(self.prepare, it) for it in chunk])
                if len(pending) > self.config.lookahead:
                    yield self._finish(pending.popleft(), call)
            while pending:
                yield self._finish(pending.popleft(), call)

    def _finish(self, futures: list[Future[PreparedImage | Unindexable]], call: Call) -> list[Outcome]:
        prepared = [f.result() for f in futures]
        ids = sorted({p.image_id for p in prepared if isinstance(p, PreparedImage)})
        chunk = self.embed(prepared, call(lambda: self.vectors.existing(ids)))
        self.store(chunk, call)
        return chunk.outcomes

    # ------------------------------------------------------------------ the steps

    def prepare(self, item: InputItem) -> PreparedImage | Unindexable:
        """Read, decode and describe one input (thread-safe); pure compute, no store touched."""
        t0 = time.perf_counter()
        try:
            data = item.read()
        except (OSError, ValueError) as exc:
            return Unindexable(item.key, "unreadable", str(exc))
        try:
            image = decode(data, self.config.decode, self.decode_budget)
        except BadImage as exc:
            return Unindexable(item.key, exc.reason, exc.detail)
        t1 = time.perf_counter()
        keypoints = self.extractor.extract(image.rgb)
        t2 = time.perf_counter()
        thumbnail = make_thumbnail(image.rgb, self.config.thumbnail_side)
        prepared = PreparedImage(item.key, image.image_id, image.width, image.height, image.nbytes, keypoints,
                                 thumbnail, self.embedder.inputs(image.rgb))
        self.observer.sift_seconds(t2 - t1)
        self.observer.decode_seconds(time.perf_counter() - t2 + t1 - t0)
        return prepared

    def embed(self, prepared: Sequence[PreparedImage | Unindexable], stored: set[int]) -> Embedded:
        """Outcomes of one chunk, embedding each image that ``stored`` (the vector index's) lacks once."""
        fresh: dict[int, PreparedImage] = {}
        outcomes: list[Outcome] = []
        for p in prepared:
            if isinstance(p, Unindexable):
                log.info("bad input", extra={"input": p.key, "reason": p.reason, "detail": p.detail})
                outcomes.append(p)
                continue
            new = p.image_id not in stored and p.image_id not in fresh
            if new:
                fresh[p.image_id] = p
            outcomes.append(Stored(p.key, p.image_id, len(p.keypoints), new))
        batch = list(fresh.values())
        rows: list[ImageRow] = []
        if batch:
            t0 = time.perf_counter()
            glob, regions = self.embedder.embed_inputs([p.cnn for p in batch], grid=self.config.store_grid)
            self.observer.embed_seconds(time.perf_counter() - t0)
            rows = [ImageRow(p.image_id, p.key, p.width, p.height, p.nbytes, len(p.keypoints), glob[i], regions[i])
                    for i, p in enumerate(batch)]
        return Embedded(outcomes, batch, rows)

    def store(self, chunk: Embedded, call: Call = call_once) -> None:
        """Write one computed chunk: features, then vectors, each call repeatable as is."""
        if chunk.fresh:
            call(lambda: self._put_features(chunk.fresh))
        if chunk.rows:
            call(lambda: self._upsert(chunk.rows))

    def _put_features(self, images: Sequence[PreparedImage]) -> None:
        self.features.put_images([(p.image_id, p.keypoints, p.thumbnail) for p in images])

    def _upsert(self, rows: Sequence[ImageRow]) -> None:
        t0 = time.perf_counter()
        try:
            self.vectors.upsert(rows)
        finally:
            self.observer.write_seconds(time.perf_counter() - t0)
