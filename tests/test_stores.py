"""The stores: MilvusStore on Milvus Lite and on a Milvus server, the feature stores, the SQLite catalog."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_settings, rgb
from memetrace.catalog import Catalog, Match
from memetrace.feature_store import FeatureStore, LocalFeatureStore, MemoryFeatureStore
from memetrace.keypoints import Keypoints
from memetrace.models import ClusterSummary, DeadLetterRow, ImageRow, OccurrenceRow
from memetrace.milvus_store import (MilvusStore, region_key,
                                    stored_dim)
from memetrace.settings import Settings

# ----------------------------------------------------------------------------- Milvus (Lite and server)


@pytest.fixture(scope="module", params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def milvus_settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of an empty store: a Milvus Lite file in its data dir, or collections of its own on the
    session's Milvus server."""
    data_dir = tmp_path_factory.mktemp("milvus") / "data"
    if request.param == "lite":
        return make_settings(data_dir)
    return make_settings(data_dir, milvus_uri=request.getfixturevalue("milvus_server_uri"),
                         milvus_collection_prefix=f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def indexed(milvus_settings: Settings, embedder, photos: dict[str, Image.Image]):
    """A store holding six real photos: (store, rows by name)."""
    store = MilvusStore(milvus_settings, embedder.dim)
    names = ["astronaut", "cat", "coffee", "coins", "cameraman", "rocket"]
    glob, regions = embedder.embed([rgb(photos[n]) for n in names])
    rows = {n: ImageRow(1000 + i, f"images/{n}.jpg", photos[n].width, photos[n].height, 12345 + i, 100 + i,
                        glob[i], regions[i]) for i, n in enumerate(names)}
    store.upsert(list(rows.values()))
    return store, rows


@pytest.mark.parametrize("milvus_settings", ["lite"], indirect=True)
def test_milvus_lite_file_lives_in_the_data_dir(indexed) -> None:
    store, _ = indexed
    uri = Path(store.settings.resolved_milvus_uri())
    assert uri.parent == store.settings.data_dir and uri.exists()


def test_upsert_is_idempotent(indexed) -> None:
    store, rows = indexed
    assert store.count() == len(rows)
    store.upsert([rows["cat"]])
    store.upsert([rows["cat"], rows["coins"]])
    assert store.count() == len(rows)
    ids, _, regions = store.vectors([rows["cat"].image_id])
    assert ids == [rows["cat"].image_id] and len(regions[0]) == len(rows["cat"].regions)  # no doubled regions


def test_vectors_round_trip(indexed) -> None:
    store, rows = indexed
    order = [rows["coins"].image_id, 42, rows["astronaut"].image_id]  # 42 is not stored
    ids, glob, regions = store.vectors(order)
    assert ids == [rows["coins"].image_id, rows["astronaut"].image_id]
    assert glob.shape == (2, store.dim) and glob.dtype == np.float32
    np.testing.assert_allclose(glob[0], rows["coins"].vector, atol=1e-6)
    np.testing.assert_allclose(glob[1], rows["astronaut"].vector, atol=1e-6)
    np.testing.assert_allclose(regions[0], rows["coins"].regions, atol=1e-6)  # same order too
    np.testing.assert_allclose(regions[1], rows["astronaut"].regions, atol=1e-6)
    assert store.vectors([])[0] == [] and store.vectors([])[1].shape == (0, store.dim)


def test_candidates_rank_the_source_first(indexed, embedder, photos: dict[str, Image.Image]) -> None:
    store, rows = indexed
    for name in ("cat", "coins", "rocket"):
        im = photos[name]
        w, h = im.size
        part = rgb(im.crop((w // 8, h // 8, w * 7 // 8, h * 7 // 8)).resize((w // 2, h // 2)))
        glob, regions = embedder.embed([part])
        cands = store.candidates(glob[0], regions[0], k=3, exclude=-1)
        assert 1 <= len(cands) <= 3
        assert cands[0].image_id == rows[name].image_id, (name, cands)
        assert cands[0].similarity > 0.8
        sims = [c.similarity for c in cands]
        assert sims == sorted(sims, reverse=True)
        assert len({c.image_id for c in cands}) == len(cands)


def test_candidates_exclude_the_query(indexed) -> None:
    store, rows = indexed
    cat = rows["cat"]
    first = store.candidates(cat.vector, cat.regions, k=4, exclude=-1)[0]
    assert first.image_id == cat.image_id and first.similarity == pytest.approx(1.0, abs=1e-4)
    cands = store.candidates(cat.vector, cat.regions, k=4, exclude=cat.image_id)
    assert cat.image_id not in {c.image_id for c in cands} and len(cands) == 4


def test_candidates_many_one_list_per_query(indexed) -> None:
    store, rows = indexed
    names = ["cat", "coffee"]
    lists = store.candidates_many(np.stack([rows[n].vector for n in names]), [rows[n].regions for n in names],
                                  k=2, exclude=[rows[n].image_id for n in names])
    assert len(lists) == 2
    for n, cands in zip(names, lists):
        assert len(cands) == 2 and rows[n].image_id not in {c.image_id for c in cands}


def test_existing_and_get(indexed) -> None:
    store, rows = indexed
    cat, coins = rows["cat"], rows["coins"]
    assert store.existing([cat.image_id, coins.image_id, 7, 8]) == {cat.image_id, coins.image_id}
    assert store.existing([]) == set()
    got = store.get([cat.image_id, 7])
    assert set(got) == {cat.image_id}
    assert got[cat.image_id]["path"] == cat.path
    assert (got[cat.image_id]["width"], got[cat.image_id]["height"]) == (cat.width, cat.height)
    assert got[cat.image_id]["nbytes"] == cat.nbytes and got[cat.image_id]["nb_points"] == cat.nb_points
    assert store.get([]) == {}


def test_reopening_sees_the_same_rows(indexed) -> None:
    store, rows = indexed
    again = MilvusStore(store.settings, store.dim)  # same file, collections already there
    assert again.count() == len(rows)
    assert stored_dim(again.client, store.settings) == store.dim


def test_occurrences_and_deadletters(indexed) -> None:
    store, rows = indexed
    assert (store.count_occurrences(), store.count_deadletters()) == (0, 0)
    assert store.image_ids_of_occurrences() == [] and store.deadletters_by_reason() == {}
    cat, coins = rows["cat"].image_id, rows["coins"].image_id
    # more rows than one query_iterator batch (1000)
    occ = [OccurrenceRow(10 + i, cat if i % 3 else coins, f"p{i}", f"https://x.test/{i}", 1_700_000_000 + i, "x",
                         f"u{i % 7}") for i in range(2500)]
    store.upsert_occurrences(occ)
    store.upsert_occurrences(occ[:10])  # redelivered: the same rows
    assert store.count_occurrences() == 2500
    ids = store.image_ids_of_occurrences()
    assert len(ids) == 2500 and ids.count(coins) == 834 and ids.count(cat) == 1666
    assert len(store.occurrences_of([coins, cat])) == 2500
    of_coins = store.occurrences_of([coins])
    assert len(of_coins) == 834 and {r["image_id"] for r in of_coins} == {coins} and {r["post_id"] for r in of_coins} == {f"p{i}" for i in range(0, 2500, 3)}
    first = next(r for r in of_coins if r["post_id"] == "p0")
    assert (first["url"], first["posted_at"], first["platform"], first["author"]) == ("https://x.test/0",
                                                                                     1_700_000_000, "x", "u0")
    dead = [DeadLetterRow(1 + i, "http_404" if i % 2 else "not_an_image", "d", f"p{i}", "", f"t/0/{i}")
            for i in range(5)]
    store.upsert_deadletters(dead)
    store.upsert_deadletters(dead[:2])
    assert store.count_deadletters() == 5
    assert store.deadletters_by_reason() == {"http_404": 2, "not_an_image": 3}


def test_clusters_publish_and_read_back(indexed) -> None:
    store, _ = indexed
    n = 16_384 + 616  # more members than one Milvus query returns
    store.publish_clusters({**{i: 5 for i in range(1, n + 1)}, n + 1: 6, n + 2: 6}, [])
    assert store.cluster_members([5, 6, 7]) == {5: list(range(1, n + 1)), 6: [n + 1, n + 2], 7: []}
    assert store.clusters_of([1, n + 2, n + 3]) == {1: 5, n + 2: 6}
    # more than the fields hold: the least posted platforms, the oldest events are left out, the rest is readable
    platforms = {"é" * 60 + f"{k:02d}": 1000 + k for k in range(50)}
    history = [{"at": k, "event": "merged", "clusters": list(range(300))} for k in range(20)]
    store.publish_clusters({}, [ClusterSummary(5, n, 99, 1, 2, 0, 0, platforms, history, 3)])
    read = store.cluster_summary(5)
    assert read is not None and 0 < len(read.platforms) < 50 and 0 < len(read.history) < 20
    kept = sorted(platforms, key=platforms.__getitem__, reverse=True)[:len(read.platforms)]
    assert read.platforms == {p: platforms[p] for p in kept}
    assert list(read.platforms.values()) == sorted(read.platforms.values(), reverse=True)  # most posted first
    assert read.history == history[-len(read.history):]
    assert [c.cluster_id for c in store.all_cluster_summaries()] == [5]
    store.publish_clusters({}, [], [5])
    assert store.cluster_summary(5) is None and store.all_cluster_summaries() == []


def test_region_keys_are_distinct_and_positive() -> None:
    ids = [1, 2, 2**62 + 5, 2**63 - 1]
    keys = {region_key(i, r) for i in ids for r in range(18)}
    assert len(keys) == len(ids) * 18
    assert all(0 < k < 2**63 for k in keys)


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
    np.testing.assert_array_equal(back.xy, kp.xy)
    np.testing.assert_array_equal(back.desc, kp.desc)
    assert (back.width, back.height) == (320, 240) and len(back) == 25


def test_keypoints_dtypes_are_normalised(features: FeatureStore) -> None:
    kp = Keypoints(xy=np.array([[1.5, 2.25]], np.float64), desc=np.full((1, 128), 7, np.int64), width=10, height=9)
    features.put_keypoints(5, kp)
    back = features.get_keypoints(5)
    assert back.xy.dtype == np.float32 and back.desc.dtype == np.uint8
    assert back.xy.tolist() == [[1.5, 2.25]] and (back.desc == 7).all()


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


def test_keys_are_sharded_by_id() -> None:
    assert FeatureStore.keypoints_key(0xABCDEF) == "keypoints/00/0000000000abcdef.npz"
    assert FeatureStore.thumbnail_key(2**63 - 1) == "thumbnails/7f/7fffffffffffffff.jpg"


def test_local_store_writes_files_atomically(tmp_path: Path) -> None:
    store = LocalFeatureStore(tmp_path / "f")
    store.put_keypoints(0xAB, _keypoints(4))
    path = tmp_path / "f" / FeatureStore.keypoints_key(0xAB)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert LocalFeatureStore(tmp_path / "f").get_keypoints(0xAB) is not None  # a new instance reads it


# ----------------------------------------------------------------------------- catalog


@pytest.fixture()
def catalog(tmp_path: Path):
    cat = Catalog(tmp_path / "deep" / "catalog.db")  # the folder is created
    yield cat
    cat.close()


def test_catalog_paths_and_images(catalog: Catalog) -> None:
    catalog.add_images([(1, 100), (2, 200)])
    catalog.add_paths([("a.jpg", 1), ("b.jpg", 2), ("a_copy.jpg", 1)])
    assert catalog.images() == {1: 100, 2: 200}
    assert catalog.paths_by_image() == {1: ["a.jpg", "a_copy.jpg"], 2: ["b.jpg"]}
    catalog.add_images([(1, 999)])  # already there: unchanged
    assert catalog.images()[1] == 100
    catalog.add_paths([("b.jpg", 1)])  # a path now holding another image
    assert catalog.paths_by_image() == {1: ["a.jpg", "a_copy.jpg", "b.jpg"]}


def test_catalog_bad_files(catalog: Catalog) -> None:
    catalog.add_bad([("empty.jpg", "empty", "zero bytes"), ("notes.png", "not_an_image", "no known image format")])
    catalog.add_bad([("empty.jpg", "empty", "zero bytes")])  # seen again: one row
    assert catalog.bad_files() == [("empty.jpg", "empty", "zero bytes"),
                                   ("notes.png", "not_an_image", "no known image format")]
    catalog.add_paths([("c.jpg", 3)])
    assert catalog.indexed_paths() == {"c.jpg"}  # bad files are read again next run
    catalog.add_paths([("empty.jpg", 4)])  # the file was fixed: no longer bad
    assert [b[0] for b in catalog.bad_files()] == ["notes.png"]


def test_catalog_matches(catalog: Catalog) -> None:
    catalog.add_matches([Match(5, 2, 40, "full"), Match(2, 9, 12, "partial")])
    catalog.add_matches([Match(2, 5, 41, "full")])  # same pair, other order: replaced
    got = sorted(catalog.matches(), key=lambda m: (m.a, m.b))
    assert got == [Match(2, 5, 41, "full"), Match(2, 9, 12, "partial")]
    assert {(m.a, m.b) for m in catalog.matches_of(9)} == {(2, 9)}
    assert len(catalog.matches_of(2)) == 2 and catalog.matches_of(77) == []


def test_catalog_clusters_and_meta(catalog: Catalog) -> None:
    catalog.set_clusters({1: 10, 2: 10, 3: 11})
    assert catalog.clusters() == {1: 10, 2: 10, 3: 11}
    catalog.set_clusters({1: 12, 4: 12})  # replaces the whole assignment
    assert catalog.clusters() == {1: 12, 4: 12}
    assert catalog.meta("root") is None
    catalog.set_meta("root", "/data/a")
    catalog.set_meta("root", "/data/b")
    assert catalog.meta("root") == "/data/b"


def test_catalog_counts(catalog: Catalog) -> None:
    assert catalog.counts() == {"images": 0, "paths": 0, "bad_files": 0, "matches": 0, "clusters": 0}
    catalog.add_images([(i, 10) for i in range(1, 7)])
    catalog.add_paths([(f"{i}.jpg", i) for i in range(1, 7)] + [("dup.jpg", 1)])
    catalog.add_bad([("x.txt", "not_an_image", "")])
    catalog.add_matches([Match(1, 2, 10, "full"), Match(2, 3, 10, "full"), Match(4, 5, 10, "full")])
    catalog.set_clusters({1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3})  # 6 is alone: not a cluster
    assert catalog.counts() == {"images": 6, "paths": 7, "bad_files": 1, "matches": 3, "clusters": 2}


def test_catalog_matched_flags(catalog: Catalog) -> None:
    catalog.add_images([(3, 1), (1, 1), (2, 1)])
    assert catalog.unmatched() == [1, 2, 3]
    catalog.mark_matched([1, 3])
    assert catalog.unmatched() == [2]
    catalog.add_images([(1, 5), (4, 5)])  # an image seen again keeps its flag
    assert catalog.unmatched() == [2, 4]


def test_catalog_persists(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    cat = Catalog(path)
    cat.add_images([(1, 10)])
    cat.add_paths([("a.jpg", 1)])
    cat.set_meta("root", "/x")
    cat.close()
    again = Catalog(path)
    assert again.images() == {1: 10} and again.paths_by_image() == {1: ["a.jpg"]} and again.meta("root") == "/x"
    again.close()
