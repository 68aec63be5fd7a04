"""The stores, one contract suite per interface run on every backend: the vector index, the
occurrence log and the cluster board on memory, Milvus Lite and (``milvus_server`` marker) a Milvus
server; the feature stores on packed local files and memory.

The SQLite stores (clusterer state, batch catalog) are specified in test_state.py."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from conftest import make_settings, rgb
from memetrace.cluster_board import ClusterBoard, MemoryClusterBoard
from memetrace.errors import ConfigError, DependencyDown, Refused
from memetrace.feature_store import FeatureStore, LocalFeatureStore, MemoryFeatureStore
from memetrace.messages import MAX_META_KEYS, META_BYTES, META_KEY_BYTES, META_VALUE_BYTES, Post, parse
from memetrace.keypoints import Keypoints
from memetrace.kpcodec import KeypointCodec, KeypointFormatError
from memetrace.milvus import (MilvusClusterBoard, MilvusConfig, MilvusOccurrenceLog, MilvusVectorIndex, connect,
                              region_key, stored_dim)
from memetrace.models import ClusterSummary, DeadLetterRow, ImageRecord, ImageRow, OccurrenceRow
from memetrace.occurrence_log import DEAD_LETTER_BYTES, OCCURRENCE_BYTES, MemoryOccurrenceLog, OccurrenceLog
from memetrace.settings import Settings
from memetrace.sqlite_file import IncompatibleFile
from memetrace.varchar import cut_utf8, json_text
from memetrace.vector_index import (IMAGE_BYTES, MemoryVectorIndex, ReducedVectorIndex, VectorIndex, now_ms,
                                    open_index, shipped_basis)

# ----------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """Opens empty stores of one kind: in memory, or collections of their own in one Milvus."""

    name: str  # memory | lite | server
    settings: Settings
    client: MilvusClient | None = None

    def config(self, metric: str = "IP") -> MilvusConfig:
        return MilvusConfig.from_settings(self.settings.model_copy(update={
            "milvus_collection_prefix": f"t{uuid.uuid4().hex[:12]}", "milvus_metric": metric}))

    def index(self, dim: int, metric: str = "IP") -> VectorIndex:
        if self.client is None:
            return MemoryVectorIndex(dim, metric)
        return MilvusVectorIndex(self.client, self.config(metric), dim)

    def log(self) -> OccurrenceLog:
        return MemoryOccurrenceLog() if self.client is None else MilvusOccurrenceLog(self.client, self.config())

    def board(self) -> ClusterBoard:
        return MemoryClusterBoard() if self.client is None else MilvusClusterBoard(self.client, self.config())


@pytest.fixture(scope="module", params=["memory", "lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    data_dir = tmp_path_factory.mktemp("stores") / "data"
    if request.param == "memory":
        yield Backend("memory", make_settings(data_dir))
        return
    uri = request.getfixturevalue("milvus_server_uri") if request.param == "server" else ""
    settings = make_settings(data_dir, milvus_uri=uri)
    client = connect(MilvusConfig.from_settings(settings))
    yield Backend(request.param, settings, client)
    client.close()


@pytest.fixture()
def milvus(backend: Backend) -> Backend:
    """The Milvus backends only: what they add to the contract (files, persistence, failures)."""
    if backend.client is None:
        pytest.skip("a Milvus backend property")
    return backend


# ----------------------------------------------------------------------------- vector index

NAMES = ["astronaut", "cat", "coffee", "coins", "cameraman", "rocket"]


@pytest.fixture(scope="module")
def indexed(backend: Backend, embedder, photos: dict[str, Image.Image]) -> tuple[VectorIndex, dict[str, ImageRow]]:
    """An index holding six real photos: (index, rows by name)."""
    index = backend.index(embedder.dim)
    glob, regions = embedder.embed([rgb(photos[n]) for n in NAMES])
    rows = {n: ImageRow(1000 + i, f"images/{n}.jpg", photos[n].width, photos[n].height, 12345 + i, 100 + i,
                        glob[i], regions[i]) for i, n in enumerate(NAMES)}
    index.upsert(list(rows.values()))
    return index, rows


def _unit(dim: int, *axes: int) -> np.ndarray:
    """Unit vectors along ``axes``, one row each."""
    return np.eye(dim, dtype=np.float32)[list(axes)]


def _row(image_id: int, vector: np.ndarray, regions: np.ndarray | None = None) -> ImageRow:
    dim = len(vector)
    return ImageRow(image_id, f"{image_id}.jpg", 10, 10, 100, 50, vector,
                    np.zeros((0, dim), np.float32) if regions is None else regions)


def test_upsert_is_idempotent(indexed) -> None:
    index, rows = indexed
    assert index.count() == len(rows)
    index.upsert([rows["cat"]])
    index.upsert([rows["cat"], rows["coins"]])
    assert index.count() == len(rows)
    ids, _, regions = index.vectors([rows["cat"].image_id])
    assert ids == [rows["cat"].image_id] and len(regions[0]) == len(rows["cat"].regions)  # no doubled regions


def test_vectors_round_trip(indexed) -> None:
    index, rows = indexed
    order = [rows["coins"].image_id, 42, rows["astronaut"].image_id]  # 42 is not stored
    ids, glob, regions = index.vectors(order)
    assert ids == [rows["coins"].image_id, rows["astronaut"].image_id]
    assert glob.shape == (2, index.dim) and glob.dtype == np.float32
    np.testing.assert_allclose(glob[0], rows["coins"].vector, atol=1e-6)
    np.testing.assert_allclose(glob[1], rows["astronaut"].vector, atol=1e-6)
    np.testing.assert_allclose(regions[0], rows["coins"].regions, atol=1e-6)  # same order too
    np.testing.assert_allclose(regions[1], rows["astronaut"].regions, atol=1e-6)
    ids, glob, regions = index.vectors(order, with_regions=False)
    assert len(ids) == 2 and [r.shape for r in regions] == [(0, index.dim)] * 2
    assert index.vectors([])[0] == [] and index.vectors([])[1].shape == (0, index.dim)


def test_candidates_rank_the_source_first(indexed, embedder, photos: dict[str, Image.Image]) -> None:
    index, rows = indexed
    for name in ("cat", "coins", "rocket"):
        im = photos[name]
        w, h = im.size
        part = rgb(im.crop((w // 8, h // 8, w * 7 // 8, h * 7 // 8)).resize((w // 2, h // 2)))
        glob, regions = embedder.embed([part])
        cands = index.candidates(glob[0], regions[0], k=3, exclude=-1)
        assert 1 <= len(cands) <= 3
        assert cands[0].image_id == rows[name].image_id, (name, cands)
        assert cands[0].similarity > 0.8
        sims = [c.similarity for c in cands]
        assert sims == sorted(sims, reverse=True)
        assert len({c.image_id for c in cands}) == len(cands)


def test_candidates_exclude_the_query(indexed) -> None:
    index, rows = indexed
    cat = rows["cat"]
    first = index.candidates(cat.vector, cat.regions, k=4, exclude=-1)[0]
    assert first.image_id == cat.image_id and first.similarity == pytest.approx(1.0, abs=1e-4)
    cands = index.candidates(cat.vector, cat.regions, k=4, exclude=cat.image_id)
    assert cat.image_id not in {c.image_id for c in cands} and len(cands) == 4


def test_candidates_many_one_list_per_query(indexed) -> None:
    index, rows = indexed
    names = ["cat", "coffee"]
    lists = index.candidates_many(np.stack([rows[n].vector for n in names]), [rows[n].regions for n in names],
                                  k=2, exclude=[rows[n].image_id for n in names])
    assert len(lists) == 2
    for n, cands in zip(names, lists):
        assert len(cands) == 2 and rows[n].image_id not in {c.image_id for c in cands}
    assert index.candidates_many(np.zeros((0, index.dim), np.float32), [], k=2, exclude=[]) == []


def test_existing_and_get(indexed) -> None:
    index, rows = indexed
    cat, coins = rows["cat"], rows["coins"]
    assert index.existing([cat.image_id, coins.image_id, 7, 8]) == {cat.image_id, coins.image_id}
    assert index.existing([]) == set()
    assert index.get([cat.image_id, 7]) == {cat.image_id: ImageRecord(cat.image_id, cat.path, cat.width, cat.height,
                                                                      cat.nbytes, cat.nb_points)}
    assert index.get([]) == {}


def test_long_non_ascii_path_is_cut_to_its_bytes(backend: Backend) -> None:
    """Milvus counts a VARCHAR in UTF-8 bytes: a 6000-byte CJK path is kept as its first whole
    characters within 4096 bytes, on every backend."""
    index = backend.index(4)
    index.upsert([replace(_row(1, _unit(4, 0)[0]), path="画" * 2000)])
    assert index.get([1])[1].path == "画" * (IMAGE_BYTES["path"] // 3)


def test_empty_index_finds_nothing(backend: Backend) -> None:
    index = backend.index(8)
    assert index.count() == 0 and not index.stored_before(now_ms() + 1000)
    assert index.candidates(_unit(8, 0)[0], _unit(8, 1, 2), k=3, exclude=-1) == []
    index.ping(3.0)


@pytest.mark.parametrize("metric", ["IP", "COSINE"])
def test_search_scores_follow_the_metric(backend: Backend, metric: str) -> None:
    """Milvus' scores: IP the dot product, COSINE the angle's cosine, highest first; a region is
    reported by the image holding it."""
    index = backend.index(4, metric)
    index.upsert([_row(1, np.array([2.0, 0, 0, 0], np.float32), _unit(4, 2) * 3),
                  _row(2, np.array([1.0, 2.0, 0, 0], np.float32))])
    expected = {"IP": [2.0, 1.0], "COSINE": [1.0, 5 ** -0.5]}[metric]
    (hits,) = index.search_images(_unit(4, 0), 2)
    assert [i for i, _ in hits] == [1, 2] and [s for _, s in hits] == pytest.approx(expected, abs=1e-5)
    (regions,) = index.search_regions(_unit(4, 2), 5)
    assert [i for i, _ in regions] == [1]
    assert regions[0][1] == pytest.approx({"IP": 3.0, "COSINE": 1.0}[metric], abs=1e-5)
    assert index.search_images(np.zeros((0, 4), np.float32), 2) == []


def test_stored_before_splits_by_indexing_time(backend: Backend) -> None:
    """Wholes stamped in milliseconds; the query regions are searched only against images stored
    before ``regions_vs_stored_before``, the other directions against everything."""
    index = backend.index(8)
    # image 1 holds image 2 as a region (2 is a crop of 1); image 3 is a crop of the query
    index.upsert([_row(1, _unit(8, 0)[0], _unit(8, 1))])
    time.sleep(0.01)
    between = now_ms()
    time.sleep(0.01)
    index.upsert([_row(2, _unit(8, 1)[0]), _row(3, _unit(8, 3)[0])])
    assert index.stored_before(now_ms() + 1) and index.stored_before(between)
    assert not index.stored_before(between - 1000)
    query, regions = _unit(8, 4)[0], _unit(8, 3)  # query whole matches nothing; its region is image 3
    sims = {c.image_id: c.similarity for c in index.candidates(query, regions, k=3, exclude=-1)}
    assert sims[3] == pytest.approx(1.0)
    (late,) = index.candidates_many(query[None], [regions], k=3, exclude=[-1], regions_vs_stored_before=between)
    assert {c.image_id: c.similarity for c in late}.get(3, 0.0) == pytest.approx(0.0)  # 3 is newer than ``between``
    (all_of,) = index.candidates_many(query[None], [regions], k=3, exclude=[-1],
                                      regions_vs_stored_before=now_ms() + 1000)
    assert {c.image_id: c.similarity for c in all_of}[3] == pytest.approx(1.0)
    # the whole of 2 is found in the regions of 1, whatever the time
    (of_two,) = index.candidates_many(_unit(8, 1), [np.zeros((0, 8), np.float32)], k=3, exclude=[2],
                                      regions_vs_stored_before=between - 1000)
    assert of_two[0].image_id == 1 and of_two[0].similarity == pytest.approx(1.0)


def test_reopening_sees_the_same_rows(milvus: Backend, indexed) -> None:
    index, rows = indexed
    again = MilvusVectorIndex(connect(index.config), index.config, index.dim)  # collections already there
    assert again.count() == len(rows)
    assert stored_dim(again.client, index.config) == index.dim


def test_reads_are_at_the_configured_consistency(milvus: Backend) -> None:
    """The API's reads (searches and the rows that describe their answers) need not wait for the
    server's time tick (Bounded); the workers' stay Strong."""
    levels: list[str] = []

    class Recording:
        def __init__(self, client: MilvusClient) -> None:
            self.client = client

        def search(self, *args: Any, **kwargs: Any) -> Any:
            levels.append(kwargs["consistency_level"])
            return self.client.search(*args, **kwargs)

        def query(self, *args: Any, **kwargs: Any) -> Any:
            levels.append(kwargs["consistency_level"])
            return self.client.query(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.client, name)

    def reads(index: MilvusVectorIndex) -> list[str]:
        levels.clear()
        assert [i for i, _ in index.search_images(_unit(4, 0), 1)[0]] == [1]
        index.search_regions(_unit(4, 1), 1)
        assert set(index.get([1])) == {1} and index.vectors([1])[0] == [1] and index.existing([1]) == {1}
        return list(levels)

    strong = MilvusVectorIndex(Recording(milvus.client), milvus.config(), 4)
    strong.upsert([_row(1, _unit(4, 0)[0], _unit(4, 1))])
    assert set(reads(strong)) == {"Strong"}
    bounded = MilvusVectorIndex(Recording(milvus.client), replace(strong.config, read_consistency="Bounded"), 4)
    assert set(reads(bounded)) == {"Bounded"} and len(levels) == 6
    board = MilvusClusterBoard(Recording(milvus.client), bounded.config)
    levels.clear()
    board.clusters_of([1])
    board.summary(1)
    assert levels == ["Bounded", "Bounded"]


def test_milvus_lite_file_lives_in_the_data_dir(milvus: Backend, indexed) -> None:
    if milvus.name != "lite":
        pytest.skip("Milvus Lite only")
    uri = Path(indexed[0].config.uri)
    assert uri.parent == milvus.settings.data_dir and uri.exists()


def test_reduced_index_stores_projections_and_answers_in_full_size(backend: Backend) -> None:
    """ReducedVectorIndex on each backend: 16-d descriptors kept as 8-d projections; a descriptor
    in the basis' span comes back whole, searches by full-size queries find it first."""
    basis = np.linalg.qr(np.random.default_rng(3).normal(size=(16, 8)))[0].astype(np.float32)
    index = ReducedVectorIndex(backend.index(8), basis)
    inside = (basis @ np.eye(8, dtype=np.float32)).T  # 8 unit vectors in the span
    index.upsert([_row(i + 1, inside[i], inside[[(i + 1) % 8]]) for i in range(8)])
    assert index.dim == 16 and index.count() == 8
    ids, glob, regs = index.vectors([3, 1])
    assert ids == [3, 1] and glob.shape == (2, 16)
    np.testing.assert_allclose(glob, inside[[2, 0]], atol=1e-5)
    np.testing.assert_allclose(regs[0], inside[[3]], atol=1e-5)
    assert index.search_images(inside[[4]], 1)[0][0][0] == 5
    assert index.search_regions(inside[[4]], 1)[0][0][0] == 4  # image 4's region is inside[4]
    assert [c.image_id for c in index.candidates(inside[5], np.zeros((0, 16), np.float32), 2, 6)][0] in (5, 7)


def test_reduced_index_refuses_a_store_of_another_size(backend: Backend) -> None:
    basis = np.linalg.qr(np.random.default_rng(4).normal(size=(16, 8)))[0].astype(np.float32)
    with pytest.raises(ConfigError, match="holds 4-dimension descriptors, MEMETRACE_VECTOR_DIMS=8"):
        ReducedVectorIndex(backend.index(4), basis)


def test_vector_dims_apply_when_the_index_is_created() -> None:
    model = "tf_efficientnet_lite0"
    made: list[int] = []

    def make(d: int) -> VectorIndex:
        made.append(d)
        return MemoryVectorIndex(d)

    fresh = open_index(make, None, lambda: 320, 128, model)
    assert isinstance(fresh, ReducedVectorIndex) and fresh.dim == 320 and made == [128]
    assert isinstance(open_index(make, 128, lambda: 320, 0, model), ReducedVectorIndex)  # reduced stays reduced
    assert type(open_index(make, 320, lambda: 320, 128, model)) is MemoryVectorIndex  # whole stays whole
    assert open_index(make, 8, lambda: 320, 128, model).dim == 8
    assert open_index(make, None, lambda: 320, 0, model).dim == 320 and made[-1] == 320


def test_the_shipped_basis_is_orthonormal_and_missing_ones_name_the_setting() -> None:
    basis = shipped_basis("tf_efficientnet_lite0", 128)
    assert basis.shape == (320, 128)
    np.testing.assert_allclose(basis.T @ basis, np.eye(128), atol=1e-4)
    with pytest.raises(ConfigError, match="MEMETRACE_VECTOR_DIMS=0"):
        shipped_basis("resnet50", 128)


def test_region_keys_are_distinct_and_positive() -> None:
    ids = [1, 2, 2**62 + 5, 2**63 - 1]
    keys = {region_key(i, r) for i in ids for r in range(18)}
    assert len(keys) == len(ids) * 18
    assert all(0 < k < 2**63 for k in keys)


# ----------------------------------------------------------------------------- occurrence log


def test_occurrence_log_starts_empty(backend: Backend) -> None:
    log = backend.log()
    assert (log.count_occurrences(), log.count_dead_letters()) == (0, 0)
    assert log.image_ids_of_occurrences() == [] and log.dead_letters_by_reason() == {}
    assert log.occurrences_of([1, 2]) == [] and log.occurrences_of([]) == []


def test_occurrences_are_keyed_by_post(backend: Backend) -> None:
    log = backend.log()
    cat, coins = 1001, 1003
    # more rows than one query_iterator batch (1000)
    occ = [OccurrenceRow(10 + i, cat if i % 3 else coins, f"p{i}", f"https://x.test/{i}", 1_700_000_000 + i, "x",
                         f"u{i % 7}") for i in range(2500)]
    log.add_occurrences(occ)
    log.add_occurrences(occ[:10])  # redelivered: the same rows
    assert log.count_occurrences() == 2500
    ids = log.image_ids_of_occurrences()
    assert len(ids) == 2500 and ids.count(coins) == 834 and ids.count(cat) == 1666
    assert len(log.occurrences_of([coins, cat])) == 2500
    of_coins = log.occurrences_of([coins])
    assert len(of_coins) == 834 and {r.image_id for r in of_coins} == {coins}
    assert {r.post_id for r in of_coins} == {f"p{i}" for i in range(0, 2500, 3)}
    first = next(r for r in of_coins if r.post_id == "p0")
    assert abs(first.seen_at - time.time()) < 600 and first == OccurrenceRow(10, coins, "p0", "https://x.test/0",
                                                                           1_700_000_000, "x", "u0", first.seen_at)
    log.add_occurrences([OccurrenceRow(10, coins, "p0", "https://x.test/moved", -1, "y", "u0")])  # same key: replaced
    assert log.count_occurrences() == 2500
    again = next(r for r in log.occurrences_of([coins]) if r.post_id == "p0")
    assert (again.url, again.posted_at, again.platform) == ("https://x.test/moved", -1, "y")


def test_occurrences_keep_their_meta(backend: Backend) -> None:
    log = backend.log()
    meta = {"likes": "3", "caption": "日本語 😀", "": "x"}  # an empty key names nothing: left out
    log.add_occurrences([OccurrenceRow(1, 7, "p1", "u", -1, "x", "a", meta=meta), OccurrenceRow(2, 7, "p2", "u", -1, "x", "a")])
    got = {r.post_id: r.meta for r in log.occurrences_of([7])}
    assert got == {"p1": {"likes": "3", "caption": "日本語 😀"}, "p2": {}}
    assert list(got["p1"]) == ["likes", "caption"]  # in the order given
    log.add_occurrences([OccurrenceRow(1, 7, "p1", "u", -1, "x", "a", meta={"likes": "4"})])  # same key: replaced
    assert {r.post_id: r.meta for r in log.occurrences_of([7])}["p1"] == {"likes": "4"}


def test_meta_is_kept_whole_at_its_bounds_and_cut_alike_over_them(backend: Backend) -> None:
    """A valid post's meta fits whole; an unchecked one (a posts CSV's columns) is cut the same way
    on every backend: keys and values to their bytes, then the first entries whose JSON fits."""
    at_bounds = {"日" * 20 + f"{i:02d}": "é" * 20 for i in range(MAX_META_KEYS - 1)} | {"k": "😀" * 80}
    assert len(json_text(at_bounds).encode()) <= META_BYTES and parse(Post, json.dumps(
        {"post_id": "p", "url": "http://h/x", "meta": at_bounds}).encode()).meta == at_bounds
    many = {f"k{i}": "v" for i in range(MAX_META_KEYS + 8)}
    long_value = {"a" * 100: "日" * 400, "b": "x"}
    heavy = {f"k{i}": "x" * 1000 for i in range(8)}
    log = backend.log()
    for i, meta in enumerate([at_bounds, many, long_value, heavy]):
        log.add_occurrences([OccurrenceRow(i, 7, f"p{i}", "u", -1, "x", "a", meta=meta)])
    got = {r.id: r.meta for r in log.occurrences_of([7])}
    assert got[0] == at_bounds
    assert got[1] == {f"k{i}": "v" for i in range(MAX_META_KEYS)}
    assert got[2] == {"a" * META_KEY_BYTES: "日" * (META_VALUE_BYTES // 3), "b": "x"}
    assert got[3] == {f"k{i}": "x" * 1000 for i in range(4)}  # a fifth would pass META_BYTES of JSON
    assert all(len(json_text(m).encode()) <= META_BYTES for m in got.values())


def _v1_occurrences(client: MilvusClient, name: str, ids: range) -> None:
    """The occurrences collection as memetrace wrote it before schema version 2 (no meta)."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
    for field, length in OCCURRENCE_BYTES.items():
        schema.add_field(field, DataType.VARCHAR, max_length=length)
    for field in ("image_id", "posted_at", "seen_at"):
        schema.add_field(field, DataType.INT64)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")
    client.insert(name, [{"id": i, "vector": [0.0, 0.0], "post_id": f"p{i}", "url": "u", "platform": "x",
                          "author": "a", "image_id": 7 + i % 2, "posted_at": i, "seen_at": 1_700_000_000}
                         for i in ids])


def test_an_occurrence_log_of_the_older_schema_is_migrated(milvus: Backend) -> None:
    """A data dir whose occurrences have no meta (schema version 1) keeps every row: the log copies
    them into its versioned collection, meta empty, and drops the old one; an interrupted copy is
    finished by the next open."""
    config = milvus.config()
    old = config.collection("occurrences")
    _v1_occurrences(milvus.client, old, range(1500))  # more than one batch of the copy
    log = MilvusOccurrenceLog(milvus.client, config)
    assert not milvus.client.has_collection(old) and log.count_occurrences() == 1500
    (row,) = [r for r in log.occurrences_of([7]) if r.post_id == "p0"]
    assert row == OccurrenceRow(0, 7, "p0", "u", 0, "x", "a", 1_700_000_000, {})
    log.add_occurrences([OccurrenceRow(0, 7, "p0", "u", 0, "x", "a", meta={"likes": "1"})])
    _v1_occurrences(milvus.client, old, range(2000, 2003))  # an older process wrote after the migration
    again = MilvusOccurrenceLog(milvus.client, config)
    assert not milvus.client.has_collection(old) and again.count_occurrences() == 1503
    assert {r.post_id: r.meta for r in again.occurrences_of([7])}["p0"] == {"likes": "1"}


def test_cut_utf8_keeps_whole_characters() -> None:
    assert cut_utf8("日本語", 8) == "日本" and cut_utf8("😀😀x", 8) == "😀😀" and cut_utf8("ab", 8) == "ab"
    assert cut_utf8("é" * 600, 1024) == "é" * 512 and cut_utf8("", 3) == "" and cut_utf8("a\ud800b", 8) == "a?b"


# at their bounds in UTF-8 bytes (whole), and over them (cut): 3-byte CJK, 4-byte emoji, 2-byte accents
_FITS = {"post_id": "日" * 341 + "x", "url": "https://x.test/" + "😀" * 1020, "platform": "😀" * 16,
         "author": "é" * 128}
_OVER = {"post_id": "日" * 400, "url": "https://x.test/" + "é" * 3000, "platform": "😀" * 17, "author": "日" * 256}


@pytest.mark.parametrize("fields", [_FITS, _OVER], ids=["at_bounds", "over_bounds"])
def test_long_non_ascii_occurrences_are_cut_to_their_bytes(backend: Backend, fields: dict[str, str]) -> None:
    """What fits in bytes is kept whole, the rest cut to whole characters, on every backend alike."""
    log = backend.log()
    log.add_occurrences([OccurrenceRow(1, 7, posted_at=5, **fields)])
    (got,) = log.occurrences_of([7])
    for name, limit in OCCURRENCE_BYTES.items():
        assert getattr(got, name) == cut_utf8(fields[name], limit) and len(getattr(got, name).encode()) <= limit
    if fields is _FITS:
        assert all(getattr(got, name) == value for name, value in fields.items())
    else:
        assert got.author == "日" * 85 and got.platform == "😀" * 16


def test_long_non_ascii_dead_letters_are_cut_to_their_bytes(backend: Backend) -> None:
    log = backend.log()
    log.add_dead_letters([DeadLetterRow(1, "理由" * 40, "詳細" * 1000, "日" * 2000,
                                        "https://x.test/" + "😀" * 2000, "話題" * 300 + "/0/1")])
    assert log.count_dead_letters() == 1
    assert log.dead_letters_by_reason() == {cut_utf8("理由" * 40, DEAD_LETTER_BYTES["reason"]): 1}


def test_dead_letters_are_keyed_by_message(backend: Backend) -> None:
    log = backend.log()
    dead = [DeadLetterRow(1 + i, "http_404" if i % 2 else "not_an_image", "d", f"p{i}", "", f"t/0/{i}")
            for i in range(5)]
    log.add_dead_letters(dead)
    log.add_dead_letters(dead[:2])
    assert log.count_dead_letters() == 5 and log.count_occurrences() == 0
    assert log.dead_letters_by_reason() == {"http_404": 2, "not_an_image": 3}
    assert list(log.dead_letters_by_reason()) == ["http_404", "not_an_image"]  # sorted by reason
    log.add_dead_letters([DeadLetterRow(1, "http_404", "again", "p0", "", "t/0/0")])  # same key, new reason
    assert log.dead_letters_by_reason() == {"http_404": 3, "not_an_image": 2}


# ----------------------------------------------------------------------------- cluster board


def _summary(cluster_id: int, images: int, **changes: Any) -> ClusterSummary:
    fields = {"posts": 4, "first_seen": 1, "last_seen": 2, "growth_hour": 1, "growth_day": 3,
              "platforms": {"x": 3, "y": 1}, "history": [{"at": 1, "event": "created", "clusters": [cluster_id]}],
              "updated_at": 3} | changes
    return ClusterSummary(cluster_id, images, **fields)


def test_cluster_board_publishes_assignments(backend: Backend) -> None:
    board = backend.board()
    assert board.clusters_of([1]) == {} and board.members([5]) == {5: []} and board.members([]) == {}
    n = 16_384 + 616  # more members than one Milvus query returns
    board.publish({**{i: 5 for i in range(1, n + 1)}, n + 1: 6, n + 2: 6}, [])
    assert board.members([5, 6, 7]) == {5: list(range(1, n + 1)), 6: [n + 1, n + 2], 7: []}
    assert board.clusters_of([1, n + 2, n + 3]) == {1: 5, n + 2: 6}
    board.publish({n + 1: 5}, [])  # changed rows only: the others stay
    assert board.members([6]) == {6: [n + 2]} and board.clusters_of([n + 1, 2]) == {n + 1: 5, 2: 5}


def test_cluster_board_publishes_and_removes_summaries(backend: Backend) -> None:
    board = backend.board()
    assert board.summary(5) is None and board.summaries() == []
    five, six = _summary(5, 3), _summary(6, 2, platforms={"file": 2}, history=[])
    board.publish({1: 5, 2: 5, 3: 5, 4: 6, 7: 6}, [five, six])
    assert board.summary(5) == five and board.summary(6) == six
    assert sorted(board.summaries(), key=lambda c: c.cluster_id) == [five, six]
    grown = _summary(5, 4, posts=9)
    board.publish({8: 5}, [grown], [6])  # 6 merged into 5
    assert board.summary(5) == grown and board.summary(6) is None and board.summaries() == [grown]
    assert board.clusters_of([4]) == {4: 6}  # removing a summary leaves assignments to the next publish


def test_oversized_summaries_keep_what_fits(backend: Backend) -> None:
    """More than Milvus' fields hold: the least posted platforms, the oldest events are left out,
    the rest is readable; every backend alike."""
    board = backend.board()
    platforms = {"é" * 60 + f"{k:02d}": 1000 + k for k in range(50)}
    history = [{"at": k, "event": "merged", "clusters": list(range(300))} for k in range(20)]
    board.publish({}, [ClusterSummary(5, 17_000, 99, 1, 2, 0, 0, platforms, history, 3)])
    read = board.summary(5)
    assert read is not None and 0 < len(read.platforms) < 50 and 0 < len(read.history) < 20
    kept = sorted(platforms, key=platforms.__getitem__, reverse=True)[:len(read.platforms)]
    assert read.platforms == {p: platforms[p] for p in kept}
    assert list(read.platforms.values()) == sorted(read.platforms.values(), reverse=True)  # most posted first
    assert read.history == history[-len(read.history):]


# ----------------------------------------------------------------------------- Milvus failures


class _Failing:
    """A MilvusClient whose ``methods`` (default: the reads) raise ``exc``; the rest goes to the real client."""

    READS = ("query", "query_iterator")

    def __init__(self, client: MilvusClient, exc: BaseException, methods: tuple[str, ...] = READS) -> None:
        self._client, self._exc, self._methods = client, exc, methods

    def __getattr__(self, name: str) -> Any:
        if name not in self._methods:
            return getattr(self._client, name)

        def fail(*_: Any, **__: Any) -> Any:
            raise self._exc

        return fail


Roles = tuple[MilvusVectorIndex, MilvusOccurrenceLog, MilvusClusterBoard]


@pytest.fixture(scope="module")
def roles(backend: Backend) -> Roles:
    """One store of each role, shared by the failure tests (a server takes ~3 s per collection)."""
    if backend.client is None:
        pytest.skip("a Milvus backend property")
    index = backend.index(8)
    index.upsert([_row(1, _unit(8, 0)[0])])
    return index, backend.log(), backend.board()


def _reads(roles: Roles) -> list[tuple[Any, Callable[[], object], object]]:
    """(store, a read that Milvus refuses on a released collection, its answer on the stored rows)."""
    index, log, board = roles
    return [(index, lambda: index.existing([1, 2]), {1}), (log, lambda: log.occurrences_of([1]), []),
            (board, lambda: board.summary(1), None)]


@contextmanager
def _failing(store: Any, exc: BaseException, methods: tuple[str, ...] = _Failing.READS) -> Iterator[None]:
    real = store.client
    store.client = _Failing(real, exc, methods)
    try:
        yield
    finally:
        store.client = real


@pytest.mark.parametrize("exc", [MilvusException(code=2, message="server unavailable"), grpc.RpcError(),
                                 ConnectionError("connection reset"), TimeoutError("deadline exceeded")],
                         ids=["milvus", "grpc", "connection", "timeout"])
def test_transient_failures_are_dependency_down(roles: Roles, exc: BaseException) -> None:
    for store, read, _ in _reads(roles):
        with _failing(store, exc), pytest.raises(DependencyDown) as down:
            read()
        assert down.value.dependency == "milvus" and down.value.__cause__ is exc


def test_malformed_requests_are_bugs_not_outages(roles: Roles) -> None:
    """Retrying a request Milvus cannot run would repeat it for ever: it is raised as it is."""
    index = roles[0]
    with pytest.raises(MilvusException) as bad_filter:  # what this Milvus answers to a filter that does not parse
        index.client.query(index.images, filter="id in [1", output_fields=["id"])
    for store, read, _ in _reads(roles):
        with _failing(store, bad_filter.value), pytest.raises(MilvusException) as raised:
            read()
        assert raised.value is bad_filter.value



def test_rows_milvus_refuses_are_refused_not_bugs(roles: Roles) -> None:
    """A write of rows the schema cannot hold fails the same way every time: Refused, which the
    consume loop dead-letters, instead of a crash that restarts on the same message for ever."""
    index, log, board = roles
    with pytest.raises(Refused, match="out of range") as refused:  # refused by pymilvus: not an INT64
        index.upsert([_row(2**64, _unit(8, 0)[0])])
    assert refused.value.dependency == "milvus"
    too_long = MilvusException(code=1100, message="length of varchar field post_id exceeds max length")
    writes = [lambda: log.add_occurrences([OccurrenceRow(1, 1, "p", "u", -1, "", "")]),
              lambda: log.add_dead_letters([DeadLetterRow(1, "r", "d", "p", "u", "s")]),
              lambda: board.publish({1: 1}, [_summary(1, 2)]), lambda: index.upsert([_row(3, _unit(8, 0)[0])])]
    for store, write in zip([log, log, board, index], writes, strict=True):
        with _failing(store, too_long, ("upsert",)), pytest.raises(Refused) as refused:
            write()
        assert refused.value.dependency == "milvus" and refused.value.__cause__ is too_long


def test_released_collections_are_loaded_again(roles: Roles) -> None:
    """A restarted Milvus Lite serves its collections released: the first call fails as
    DependencyDown, having loaded them again, so the caller's retry succeeds."""
    for store, read, expected in _reads(roles):
        for name in store.collections:
            store.client.release_collection(name)
        with pytest.raises(DependencyDown, match="load"):
            read()
        assert read() == expected


def test_unreachable_milvus_is_dependency_down() -> None:
    with pytest.raises(DependencyDown, match="MEMETRACE_MILVUS_URI"):
        connect(MilvusConfig(uri="http://127.0.0.1:9"), attempts=1)


# ----------------------------------------------------------------------------- feature stores


@pytest.fixture(params=["local", "memory"])
def features(request: pytest.FixtureRequest, tmp_path: Path) -> FeatureStore:
    return LocalFeatureStore(tmp_path / "features") if request.param == "local" else MemoryFeatureStore()


def _keypoints(n: int = 25) -> Keypoints:
    rng = np.random.default_rng(n)
    return Keypoints(xy=(rng.random((n, 2)) * 300).astype(np.float32),
                     desc=rng.integers(0, 256, (n, 128)).astype(np.uint8), width=320, height=240)


def test_keypoints_round_trip(features: FeatureStore) -> None:
    kp = _keypoints()
    features.put_keypoints(123, kp)
    back = features.get_keypoints(123)
    assert back is not None
    assert back.xy.dtype == np.float32 and back.desc.dtype == np.uint8
    np.testing.assert_allclose(back.xy, kp.xy, atol=320 / 65535)  # 16-bit fixed point over the longest side
    assert back.desc.shape == (25, 128)
    assert (back.width, back.height) == (320, 240) and len(back) == 25


def test_raw_coding_keeps_descriptors_exactly(features: FeatureStore) -> None:
    features.codec = KeypointCodec("raw")
    kp = _keypoints()
    features.put_keypoints(1, kp)
    np.testing.assert_array_equal(features.get_keypoints(1).desc, kp.desc)


def test_keypoints_dtypes_are_normalised(features: FeatureStore) -> None:
    kp = Keypoints(xy=np.array([[1.5, 2.25]], np.float64), desc=np.full((1, 128), 7, np.int64), width=10, height=9)
    features.put_keypoints(5, kp)
    back = features.get_keypoints(5)
    assert back.xy.dtype == np.float32 and back.desc.dtype == np.uint8
    np.testing.assert_allclose(back.xy, [[1.5, 2.25]], atol=1e-3)


def test_empty_keypoints_round_trip(features: FeatureStore) -> None:
    features.put_keypoints(9, Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), 50, 40))
    back = features.get_keypoints(9)
    assert len(back) == 0 and back.desc.shape == (0, 128) and (back.width, back.height) == (50, 40)


def test_thumbnail_round_trip(features: FeatureStore) -> None:
    jpeg = b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"
    features.put_thumbnail(77, jpeg)
    assert features.get_thumbnail(77) == jpeg
    features.put_thumbnail(77, b"second")  # overwrite
    assert features.get_thumbnail(77) == b"second"


def test_missing_keys(features: FeatureStore) -> None:
    assert features.get_keypoints(1) is None
    assert features.get_thumbnail(1) is None
    assert not features.exists(FeatureStore.keypoints_key(1))
    features.put_keypoints(1, _keypoints(3))
    assert features.exists(FeatureStore.keypoints_key(1))
    assert not features.exists(FeatureStore.thumbnail_key(1))
    assert features.get_keypoints(2) is None


def test_delete_and_remove_images(features: FeatureStore) -> None:
    for i in (1, 2):
        features.put_keypoints(i, _keypoints(3))
        features.put_thumbnail(i, b"jpeg")
    features.delete(FeatureStore.thumbnail_key(2))
    features.remove_images([1, 99])
    assert features.get_keypoints(1) is None and features.get_thumbnail(1) is None
    assert features.get_keypoints(2) is not None and features.get_thumbnail(2) is None


def test_keys_are_sharded_by_id() -> None:
    assert FeatureStore.keypoints_key(0xABCDEF) == "keypoints/00/0000000000abcdef.kpc"
    assert FeatureStore.thumbnail_key(2**63 - 1) == "thumbnails/7f/7fffffffffffffff.jpg"


def test_local_store_packs_objects_into_one_file_per_kind(tmp_path: Path) -> None:
    store = LocalFeatureStore(tmp_path / "f")
    for i in range(20):
        store.put_keypoints(i, _keypoints(4))
        store.put_thumbnail(i, b"x" * 3000)
    assert store.count("keypoints") == 20 and store.count("thumbnails") == 20
    store.close()
    assert {p.name for p in (tmp_path / "f").iterdir() if not p.name.endswith(("-wal", "-shm"))} == \
        {"keypoints.db", "thumbnails.db"}
    again = LocalFeatureStore(tmp_path / "f")  # a new instance reads them
    assert again.get_keypoints(7) is not None and again.get_thumbnail(19) == b"x" * 3000
    assert LocalFeatureStore(tmp_path / "empty").count("keypoints") == 0
    assert not (tmp_path / "empty").exists()  # counting creates nothing


def test_local_store_refuses_the_one_file_per_image_layout(tmp_path: Path) -> None:
    (tmp_path / "f" / "keypoints" / "00").mkdir(parents=True)
    with pytest.raises(IncompatibleFile, match="older format.*memetrace reset"):
        LocalFeatureStore(tmp_path / "f")


def test_keypoints_of_another_format_are_refused_in_one_line(features: FeatureStore) -> None:
    features.put_bytes(FeatureStore.keypoints_key(3), b"PK\x03\x04 an old npz")
    with pytest.raises(KeypointFormatError, match="keypoints/.*older format") as err:
        features.get_keypoints(3)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- removing images (every store;
# the feature stores': test_s3_feature_store.py)


def test_vector_index_removes_images_and_their_regions(backend: Backend) -> None:
    index = backend.index(8)
    index.upsert([_row(1, _unit(8, 0)[0], _unit(8, 1, 2)), _row(2, _unit(8, 3)[0], _unit(8, 4))])
    index.remove_images([1, 99])  # 99 was never stored
    index.remove_images([])
    assert index.count() == 1 and index.existing([1, 2]) == {2}
    assert [i for i, _ in index.search_regions(_unit(8, 1), 5)[0]] == [2]  # its regions went with it
    assert [i for i, _ in index.search_images(_unit(8, 0), 5)[0]] == [2]
    assert index.vectors([1])[0] == []


def test_occurrence_log_removes_the_posts_of_images(backend: Backend) -> None:
    log = backend.log()
    log.add_occurrences([OccurrenceRow(10 + i, 1 if i < 3 else 2, f"p{i}", f"https://x.test/{i}", -1, "x", "u")
                         for i in range(5)])
    log.remove_images([1])
    assert log.count_occurrences() == 2 and sorted(log.image_ids_of_occurrences()) == [2, 2]


def test_cluster_board_removes_the_assignment_of_images(backend: Backend) -> None:
    board = backend.board()
    board.publish({1: 5, 2: 5, 3: 6}, [])
    board.remove_images([2, 3])
    assert board.members([5, 6]) == {5: [1], 6: []} and board.clusters_of([1, 2, 3]) == {1: 5}


def test_graph_state_removes_images_with_their_edges_posts_and_clusters(graph_state) -> None:
    from memetrace.clusterer.service import recluster
    from memetrace.models import Match

    graph_state.add_images([(1, 10), (2, 10), (3, 10)])
    graph_state.add_matches([Match(1, 2, 30, "whole"), Match(2, 3, 30, "whole")])
    graph_state.add_posts([("file:a", 1, -1, "file"), ("file:b", 2, -1, "file")])
    recluster(graph_state, "components")
    assert len(set(graph_state.clusters().values())) == 1
    graph_state.remove_images([2])
    assert graph_state.images() == {1: 10, 3: 10} and graph_state.matches() == []
    assert {s.image_id for s in graph_state.occurrence_stats(2)} == {1}
    run = recluster(graph_state, "components")  # the image leaves its cluster, which falls apart
    assert 2 not in graph_state.clusters() and graph_state.counts()["clusters"] == 0 and len(run.removed) == 1
