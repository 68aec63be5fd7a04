"""The batch embedding worker: inputs -> decoded images -> descriptors + keypoints -> stores.

For each chunk of inputs::

    read + decode + SIFT + thumbnail  (thread pool, overlaps the previous chunk's embedding)
    -> skip images already in Milvus (same bytes = same id: only the new path is recorded)
    -> embed (batched, GPU when present)
    -> feature store (keypoints, thumbnail) -> Milvus (vectors) -> catalog (paths, images)

The catalog is written last, so an interrupted run leaves at worst rows that are written again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import cv2
import numpy as np

from memetrace.ingest.sources import InputItem
from memetrace.catalog import Catalog
from memetrace.embedder import Embedder
from memetrace.feature_store import FeatureStore
from memetrace.imageio import BadImage, DecodedImage, decode
from memetrace.keypoints import KeypointExtractor, Keypoints
from memetrace.milvus_store import MilvusStore
from memetrace.models import ImageRow
from memetrace.regions import Box, content_boxes
from memetrace.settings import Settings

log = logging.getLogger(__name__)

LOOKAHEAD = 2


@dataclass
class Prepared:
    key: str
    image: DecodedImage
    boxes: list[Box]
    keypoints: Keypoints
    thumbnail: bytes


@dataclass
class IndexReport:
    seen: int = 0
    new_images: int = 0
    duplicates: int = 0
    bad: dict[str, int] = field(default_factory=dict)


def make_thumbnail(rgb: np.ndarray, side: int) -> bytes:
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return buf.tobytes()


def _chunks(items: Iterable[InputItem], size: int) -> Iterator[list[InputItem]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class Indexer:
    def __init__(self, settings: Settings, embedder: Embedder, extractor: KeypointExtractor,
                 store: MilvusStore, features: FeatureStore, catalog: Catalog | None) -> None:
        """``catalog``: None for the streaming ingest, whose record is Milvus' occurrences and dead
        letters (a per-worker SQLite file would only duplicate it, and count posts twice)."""
        self.s = settings
        self.embedder = embedder
        self.extractor = extractor
        self.store = store
        self.features = features
        self.catalog = catalog

    def prepare(self, item: InputItem) -> Prepared | BadImage:
        try:
            data = item.read()
        except (OSError, ValueError) as exc:
            return BadImage("unreadable", str(exc))
        try:
            image = decode(data, max_pixels=self.s.max_pixels, min_side=self.s.min_side)
        except BadImage as exc:
            return exc
        boxes = content_boxes(image.rgb)
        keypoints = self.extractor.extract(image.rgb)
        return Prepared(item.key, image, boxes, keypoints, make_thumbnail(image.rgb, self.s.thumbnail_side))

    def index(self, items: Iterable[InputItem], on_progress: Callable[[int], None] = lambda n: None) -> IndexReport:
        report = IndexReport()
        chunk_size = max(8, self.s.batch_size)
        # the pool prepares up to LOOKAHEAD chunks while this thread embeds and writes one: enough
        # to keep both busy, few enough to bound the decoded images held in memory
        pending: deque[list[tuple[InputItem, Future]]] = deque()
        with ThreadPoolExecutor(self.s.prepare_threads) as pool:
            for chunk in _chunks(items, chunk_size):
                pending.append([(it, pool.submit(self.prepare, it)) for it in chunk])
                if len(pending) > LOOKAHEAD:
                    self._store_next(pending, report, on_progress)
            while pending:
                self._store_next(pending, report, on_progress)
        return report

    def _store_next(self, pending: deque, report: IndexReport, on_progress: Callable[[int], None]) -> None:
        chunk = pending.popleft()
        self._store(chunk, report)
        on_progress(len(chunk))

    def _store(self, pending: list[tuple[InputItem, Future]], report: IndexReport) -> None:
        fresh: dict[int, Prepared] = {}
        paths: list[tuple[str, int]] = []
        bad: list[tuple[str, str, str]] = []
        results = [(item, fut.result()) for item, fut in pending]
        # Milvus, shared by every worker, says what is stored already: written features come
        # first and Milvus after them, so a stored image has its keypoints too
        stored = self.store.existing([r.image.image_id for _, r in results if not isinstance(r, BadImage)])
        for item, result in results:
            report.seen += 1
            if isinstance(result, BadImage):
                bad.append((item.key, result.reason, result.detail))
                report.bad[result.reason] = report.bad.get(result.reason, 0) + 1
                log.info("bad input", extra={"input": item.key, "reason": result.reason, "detail": result.detail})
                continue
            image_id = result.image.image_id
            paths.append((item.key, image_id))
            if image_id in stored or image_id in fresh:
                report.duplicates += 1
            else:
                fresh[image_id] = result
        # a run that stopped after Milvus but before the catalog left stored images unknown here
        known = [(r.image.image_id, len(r.keypoints)) for _, r in results
                 if not isinstance(r, BadImage) and r.image.image_id in stored]
        if fresh:
            batch = list(fresh.values())
            glob, regions = self.embedder.embed([p.image.rgb for p in batch], [p.boxes for p in batch])
            for p in batch:
                self.features.put_keypoints(p.image.image_id, p.keypoints)
                self.features.put_thumbnail(p.image.image_id, p.thumbnail)
            self.store.upsert([
                ImageRow(p.image.image_id, p.key, p.image.width, p.image.height, p.image.nbytes,
                         len(p.keypoints), glob[i], regions[i]) for i, p in enumerate(batch)])
            known += [(p.image.image_id, len(p.keypoints)) for p in batch]
            report.new_images += len(fresh)
        if self.catalog is not None:
            self.catalog.add_images(known)
            self.catalog.add_paths(paths)
            self.catalog.add_bad(bad)
