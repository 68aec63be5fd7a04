"""The indexer on in-memory stores (MemoryVectorIndex, MemoryFeatureStore) and the session's
embedder: one outcome per input, same bytes stored once, refused inputs with their reason,
features before vectors, writes retried without computing anything again, and prepared
images that hold no decoded pixels."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image

from conftest import sift_config
from memetrace.embedder import EmbedInput
from memetrace.errors import DependencyDown
from memetrace.feature_store import LocalFeatureStore, MemoryFeatureStore
from memetrace.imageio import DecodeLimits
from memetrace.ingest.indexer import (
    IndexConfig,
    Indexer,
    IndexObserver,
    IndexReport,
    Outcome,
    PreparedImage,
    Stored,
    Unindexable,
)
from memetrace.ingest.sources import InputItem
from memetrace.keypoints import KeypointExtractor
from memetrace.models import ImageRow
from memetrace.regions import GRID
from memetrace.sqlite_file import SqliteFile
from memetrace.vector_index import MemoryVectorIndex

T = TypeVar("T")
NAMES = ("astronaut", "cat", "coffee", "rocket")


class RecordingEmbedder:
    """The session's embedder, counting the images it is asked to embed."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.embedded: list[int] = []  # images per embed_inputs call

    def inputs(self, rgb: np.ndarray) -> EmbedInput:
        return self.inner.inputs(rgb)

    def embed_inputs(self, inputs: Sequence[EmbedInput], grid: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
        self.embedded.append(len(inputs))
        return self.inner.embed_inputs(inputs, grid)


class FlakyIndex(MemoryVectorIndex):
    """A vector index whose first ``failures`` upserts fail as a Milvus that is down does."""

    def __init__(self, dim: int, failures: int) -> None:
        super().__init__(dim)
        self.failures = failures
        self.upserts = 0

    def upsert(self, rows: Sequence[ImageRow]) -> None:
        self.upserts += 1
        if self.upserts <= self.failures:
            raise DependencyDown("milvus", "connection refused")
        super().upsert(rows)


def retrying(fn: Callable[[], T]) -> T:
    """What the streaming worker's retry does, without the waiting."""
    for _ in range(10):
        try:
            return fn()
        except DependencyDown:
            continue
    raise AssertionError("still failing after 10 attempts")


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def item(key: str, data: bytes, reads: list[str] | None = None) -> InputItem:
    def read() -> bytes:
        if reads is not None:
            reads.append(key)
        return data

    return InputItem(key, read)


def unreadable(key: str) -> InputItem:
    def read() -> bytes:
        raise PermissionError(13, "Permission denied", key)

    return InputItem(key, read)


def config(chunk_size: int = 8) -> IndexConfig:
    return IndexConfig(DecodeLimits(), thumbnail_side=160, chunk_size=chunk_size, prepare_threads=2, lookahead=1)


def run(indexer: Indexer, items: list[InputItem], **kwargs) -> list[Outcome]:
    return [o for chunk in indexer.index(items, **kwargs) for o in chunk]


@pytest.fixture(scope="module")
def photo_bytes(photos) -> dict[str, bytes]:
    return {name: jpeg(photos[name]) for name in NAMES}


@pytest.fixture()
def recording(embedder) -> RecordingEmbedder:
    return RecordingEmbedder(embedder)


@pytest.fixture()
def extractor() -> KeypointExtractor:
    return KeypointExtractor(sift_config())


def test_one_outcome_per_input_in_input_order_same_bytes_stored_once_refusals_with_reasons(
        recording: RecordingEmbedder, extractor: KeypointExtractor, photo_bytes: dict[str, bytes]) -> None:
    index, features = MemoryVectorIndex(recording.inner.dim), MemoryFeatureStore()
    indexer = Indexer(config(), recording, extractor, index, features)
    items = [item(f"{n}.jpg", photo_bytes[n]) for n in NAMES]
    items.insert(2, item("copy-of-cat.jpg", photo_bytes["cat"]))
    items += [item("empty.jpg", b""), item("notes.txt", b"just some text, no image"), unreadable("locked.jpg")]

    outcomes = run(indexer, items)

    assert [o.key for o in outcomes] == [it.key for it in items]
    by_key = {o.key: o for o in outcomes}
    assert {k: (o.reason if isinstance(o, Unindexable) else "stored") for k, o in by_key.items()} == {
        "astronaut.jpg": "stored", "cat.jpg": "stored", "copy-of-cat.jpg": "stored", "coffee.jpg": "stored",
        "rocket.jpg": "stored", "empty.jpg": "empty", "notes.txt": "not_an_image", "locked.jpg": "unreadable"}
    assert "Permission denied" in by_key["locked.jpg"].detail
    cat, copy = by_key["cat.jpg"], by_key["copy-of-cat.jpg"]
    assert isinstance(cat, Stored) and isinstance(copy, Stored)
    assert cat.image_id == copy.image_id and cat.new and not copy.new
    stored = [o for o in outcomes if isinstance(o, Stored)]
    assert sum(o.new for o in stored) == len(NAMES) and recording.embedded == [len(NAMES)]
    assert index.count() == len(NAMES) and index.existing([o.image_id for o in stored]) == {o.image_id for o in stored}
    for o in stored:  # what an outcome says is what the stores hold
        kp = features.get_keypoints(o.image_id)
        assert kp is not None and len(kp) == o.nb_points > 0
        assert features.get_thumbnail(o.image_id) is not None
        assert index.get([o.image_id])[o.image_id].nb_points == o.nb_points
    report = IndexReport()
    report.add(outcomes)
    assert (report.seen, report.new_images, report.duplicates) == (len(items), len(NAMES), 1)
    assert report.bad == {"empty": 1, "not_an_image": 1, "unreadable": 1}


def test_the_grid_windows_are_stored_only_when_told(recording: RecordingEmbedder, extractor: KeypointExtractor,
                                                   photo_bytes: dict[str, bytes]) -> None:
    """By default only the content boxes' regional descriptors are stored (the grid windows' cost
    nine vectors an image for no copy more on the benchmark); ``store_grid`` keeps them too."""
    stored = {}
    for store_grid in (False, True):
        index = MemoryVectorIndex(recording.inner.dim)
        indexer = Indexer(replace(config(), store_grid=store_grid), recording, extractor, index, MemoryFeatureStore())
        outcome = run(indexer, [item("rocket.jpg", photo_bytes["rocket"])])[0]
        stored[store_grid] = index.vectors([outcome.image_id])[2][0]
    assert len(stored[False]) > 0  # the rocket photo has content boxes
    assert len(stored[True]) == len(GRID) + len(stored[False])
    np.testing.assert_allclose(stored[True][len(GRID):], stored[False], atol=1e-5)


def test_images_already_stored_are_not_embedded_again_nor_new(
        recording: RecordingEmbedder, extractor: KeypointExtractor, photo_bytes: dict[str, bytes]) -> None:
    index, features = MemoryVectorIndex(recording.inner.dim), MemoryFeatureStore()
    indexer = Indexer(config(chunk_size=2), recording, extractor, index, features)
    first = run(indexer, [item("a/cat.jpg", photo_bytes["cat"]), item("a/coffee.jpg", photo_bytes["coffee"])])
    # same bytes again, in a later chunk of the same call and in a second call
    again = run(indexer, [item("b/rocket.jpg", photo_bytes["rocket"]), item("b/x.jpg", photo_bytes["astronaut"]),
                          item("b/cat.jpg", photo_bytes["cat"]), item("b/y.jpg", photo_bytes["astronaut"])])

    assert all(isinstance(o, Stored) and o.new for o in first)
    assert [(o.key, o.new) for o in again if isinstance(o, Stored)] == [
        ("b/rocket.jpg", True), ("b/x.jpg", True), ("b/cat.jpg", False), ("b/y.jpg", False)]
    assert sum(recording.embedded) == 4 and index.count() == 4


def test_a_failing_vector_index_is_retried_without_decoding_or_embedding_again(
        recording: RecordingEmbedder, extractor: KeypointExtractor, photo_bytes: dict[str, bytes]) -> None:
    index, features = FlakyIndex(recording.inner.dim, failures=3), MemoryFeatureStore()
    writes: list[float] = []
    indexer = Indexer(config(), recording, extractor, index, features, IndexObserver(write_seconds=writes.append))
    reads: list[str] = []
    items = [item(f"{n}.jpg", photo_bytes[n], reads) for n in NAMES]

    outcomes = run(indexer, items, call=retrying)

    assert index.upserts == 4 and len(writes) == 4  # 3 failed attempts, then the write
    assert recording.embedded == [len(NAMES)]  # embedded once, not once per attempt
    assert sorted(reads) == sorted(it.key for it in items)  # each input read (and decoded) once
    assert index.count() == len(NAMES) and all(isinstance(o, Stored) and o.new for o in outcomes)


def test_without_retries_a_failing_vector_index_raises_and_stored_features_come_first(
        recording: RecordingEmbedder, extractor: KeypointExtractor, photo_bytes: dict[str, bytes]) -> None:
    index, features = FlakyIndex(recording.inner.dim, failures=1), MemoryFeatureStore()
    indexer = Indexer(config(), recording, extractor, index, features)
    items = [item("cat.jpg", photo_bytes["cat"])]

    with pytest.raises(DependencyDown, match="milvus"):
        run(indexer, items)
    assert index.count() == 0 and len(features.blobs) == 2  # keypoints and thumbnail: vectors come last
    [again] = run(indexer, items)  # the next run stores it, as new: the vector index never had it
    assert isinstance(again, Stored) and again.new and index.count() == 1


def test_a_chunks_features_go_to_disk_in_one_transaction_per_file(
        recording: RecordingEmbedder, extractor: KeypointExtractor, photo_bytes: dict[str, bytes],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commits: list[str] = []  # each commit waits for the disk: one per object was a third of the ingest
    write = SqliteFile.write
    monkeypatch.setattr(SqliteFile, "write", lambda self, sql, rows: (commits.append(self.path.name),
                                                                      write(self, sql, rows)))
    features = LocalFeatureStore(tmp_path / "features")
    indexer = Indexer(config(), recording, extractor, MemoryVectorIndex(recording.inner.dim), features)

    outcomes = run(indexer, [item(f"{n}.jpg", photo_bytes[n]) for n in NAMES])

    assert sorted(commits) == ["keypoints.db", "thumbnails.db"]
    for o in outcomes:
        assert isinstance(o, Stored) and len(features.get_keypoints(o.image_id)) == o.nb_points > 0
        assert features.get_thumbnail(o.image_id)[:2] == b"\xff\xd8"


def test_observer_gets_each_step_timed(recording: RecordingEmbedder, extractor: KeypointExtractor,
                                       photo_bytes: dict[str, bytes]) -> None:
    seen: dict[str, list[float]] = {"decode": [], "sift": [], "embed": [], "write": []}
    observer = IndexObserver(decode_seconds=seen["decode"].append, sift_seconds=seen["sift"].append,
                             embed_seconds=seen["embed"].append, write_seconds=seen["write"].append)
    indexer = Indexer(config(), recording, extractor, MemoryVectorIndex(recording.inner.dim), MemoryFeatureStore(),
                      observer)
    run(indexer, [item(f"{n}.jpg", photo_bytes[n]) for n in NAMES] + [item("empty.jpg", b"")])

    assert {k: len(v) for k, v in seen.items()} == {"decode": len(NAMES), "sift": len(NAMES), "embed": 1, "write": 1}
    assert all(s >= 0 for v in seen.values() for s in v)


def test_a_prepared_image_holds_only_what_embedding_needs_whatever_the_input_size(
        recording: RecordingEmbedder, extractor: KeypointExtractor, photos) -> None:
    big = photos["coffee"].resize((4000, 3000))  # 12 MP: 36 MB as RGB
    buf = io.BytesIO()
    big.save(buf, format="PNG", compress_level=1)
    indexer = Indexer(config(), recording, extractor, MemoryVectorIndex(recording.inner.dim), MemoryFeatureStore())

    prepared = indexer.prepare(item("big.png", buf.getvalue()))

    assert isinstance(prepared, PreparedImage) and (prepared.width, prepared.height) == (4000, 3000)
    side, box_side = recording.inner.config.image_size, recording.inner.config.box_image_size
    assert prepared.cnn.whole.shape == (side, side, 3)
    assert all(c.shape == (box_side, box_side, 3) and c.base is None for c in prepared.cnn.crops)
    arrays = [prepared.cnn.whole, *prepared.cnn.crops, prepared.keypoints.xy, prepared.keypoints.desc]
    assert sum(a.nbytes for a in arrays) + len(prepared.thumbnail) < 1_000_000
