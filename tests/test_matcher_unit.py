"""matcher.matching.Matcher on the in-memory backends: the regional-search shortcut and pair deduplication.

The descriptors are hand-made unit vectors, so which search direction can find which pair is
decided by the test; the keypoints are real SIFT of packaged photos, so every pair is verified
as it would be in production.

Layout (``e_i``: the i-th unit vector; a region is what an image holds of another)::

    old  cat        whole e0, region e1     new  cat crop      whole e1   (the old image holds the region)
    old  coffee crop whole e3               new  coffee        whole e2, region e3 (the new image holds it)
    new  astronaut  whole e4, region e5     new  astronaut crop whole e5  (both new)
    old  coins      whole e6                (no copy)
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from conftest import make_settings, rgb
from memetrace.byte_lru import ENTRY_BYTES
from memetrace.errors import DependencyDown
from memetrace.feature_store import MemoryFeatureStore
from memetrace.keypoints import KeypointExtractor, Keypoints, SiftConfig
from memetrace.matcher.matching import MatchConfig, Matcher
from memetrace.matcher.verify import Overlay, Prepared, Verification, Verifier, VerifyConfig, never
from memetrace.models import ImageRow
from memetrace.vector_index import Hits, MemoryVectorIndex, now_ms

DIM = 8
CAT, CAT_CROP, COFFEE_CROP, COFFEE, ASTRONAUT, ASTRONAUT_CROP, COINS = range(1, 8)
OLD = (CAT, COFFEE_CROP, COINS)
NEW = (CAT_CROP, COFFEE, ASTRONAUT, ASTRONAUT_CROP)
COPIES = {(CAT, CAT_CROP), (COFFEE_CROP, COFFEE), (ASTRONAUT, ASTRONAUT_CROP)}
# image -> (whole, regions) as indexes of unit vectors
VECTORS = {CAT: (0, [1]), CAT_CROP: (1, []), COFFEE_CROP: (3, []), COFFEE: (2, [3]), ASTRONAUT: (4, [5]),
           ASTRONAUT_CROP: (5, []), COINS: (6, [])}


def _centre_crop(im: Image.Image, share: float = 0.5) -> Image.Image:
    """The centre of ``im`` covering ``share`` of its area."""
    w, h = im.size
    cw, ch = round(w * share ** 0.5), round(h * share ** 0.5)
    x, y = (w - cw) // 2, (h - ch) // 2
    return im.crop((x, y, x + cw, y + ch))


@pytest.fixture(scope="module")
def keypoints(photos: dict[str, Image.Image], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Keypoints]:
    s = make_settings(tmp_path_factory.mktemp("matcher"))
    extractor = KeypointExtractor(SiftConfig.from_settings(s))
    images = {CAT: photos["cat"], CAT_CROP: _centre_crop(photos["cat"]), COFFEE: photos["coffee"],
              COFFEE_CROP: _centre_crop(photos["coffee"]), ASTRONAUT: photos["astronaut"],
              ASTRONAUT_CROP: _centre_crop(photos["astronaut"]), COINS: photos["coins"]}
    return {i: extractor.extract(rgb(im)) for i, im in images.items()}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> MatchConfig:
    return MatchConfig.from_settings(make_settings(tmp_path_factory.mktemp("config")))


class RecordingIndex(MemoryVectorIndex):
    """Remembers the ``stored_before`` bound of each image search: with ``all_stored_since``, the
    searches of query regions carry it, those of query wholes do not."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.bounds: list[int | None] = []

    def search_images(self, vectors: np.ndarray, limit: int, stored_before: int | None = None) -> Hits:
        self.bounds.append(stored_before)
        return super().search_images(vectors, limit, stored_before)


class RecordingVerifier(Verifier):
    """Counts the verification of each unordered pair (images told apart by their descriptors)."""

    def __init__(self, config: VerifyConfig, keypoints: dict[int, Keypoints]) -> None:
        super().__init__(config)
        self.image_of = {Prepared(kp).desc.tobytes(): i for i, kp in keypoints.items()}
        self.pairs: Counter[frozenset[int]] = Counter()

    def verify_many(self, query: Prepared, candidates: Sequence[Prepared], overlay: Overlay = never
                    ) -> list[Verification]:
        q = self.image_of[query.desc.tobytes()]
        self.pairs.update(frozenset((q, self.image_of[c.desc.tobytes()])) for c in candidates)
        return super().verify_many(query, candidates, overlay)


def _store(index: MemoryVectorIndex, features: MemoryFeatureStore, keypoints: dict[int, Keypoints],
           ids: Sequence[int]) -> None:
    eye = np.eye(DIM, dtype=np.float32)
    for i in ids:
        features.put_keypoints(i, keypoints[i])
    index.upsert([ImageRow(i, f"{i}.jpg", keypoints[i].width, keypoints[i].height, 1000, len(keypoints[i]),
                           eye[VECTORS[i][0]], eye[VECTORS[i][1]].reshape(-1, DIM)) for i in ids])


def _stored_in_two_runs(keypoints: dict[int, Keypoints]) -> tuple[RecordingIndex, MemoryFeatureStore, int]:
    """The old images, then the new ones: (index, features, a time between the two runs)."""
    index, features = RecordingIndex(DIM), MemoryFeatureStore()
    _store(index, features, keypoints, OLD)
    time.sleep(0.01)
    since = now_ms()
    time.sleep(0.01)
    _store(index, features, keypoints, NEW)
    return index, features, since


def _pairs(matches) -> set[tuple[int, int]]:
    return {(m.a, m.b) for m in matches}


def test_new_images_find_every_copy_with_the_shortcut(keypoints, config: MatchConfig) -> None:
    """Matching the new images with ``all_stored_since``: query regions are searched only against
    older images, yet both-new pairs are found from the other side (the crop's whole in the
    image's regions), and so is a pair where only the old image holds the region."""
    index, features, since = _stored_in_two_runs(keypoints)
    matcher = Matcher(config, index, features)
    found = _pairs(matcher.match_stored(list(NEW), all_stored_since=since))
    assert found == COPIES
    assert set(index.bounds) == {None, since}  # the query regions were searched, against older images only
    # the same edges as searching every direction against everything
    assert _pairs(Matcher(config, index, features).match_stored(list(NEW))) == COPIES


def test_first_run_searches_no_regions_and_still_finds_the_copies(keypoints, config: MatchConfig) -> None:
    """Nothing stored before the run: no query region is searched at all."""
    index, features = RecordingIndex(DIM), MemoryFeatureStore()
    started = now_ms() - 1
    _store(index, features, keypoints, OLD + NEW)
    found = _pairs(Matcher(config, index, features).match_stored(list(OLD + NEW), all_stored_since=started))
    assert found == COPIES and set(index.bounds) == {None}  # query wholes only


def test_the_shortcut_without_the_other_side_would_miss_pairs(keypoints, config: MatchConfig) -> None:
    """The bound is real: querying only the image that holds the region, with the shortcut, misses
    its new crop (the run is supposed to query the crop too)."""
    index, features, since = _stored_in_two_runs(keypoints)
    found = _pairs(Matcher(config, index, features).match_stored([ASTRONAUT], all_stored_since=since))
    assert found == set()
    assert _pairs(Matcher(config, index, features).match_stored([ASTRONAUT])) == {(ASTRONAUT, ASTRONAUT_CROP)}


@pytest.mark.parametrize("chunk", [1, 64], ids=["pair-across-chunks", "pair-in-one-chunk"])
def test_each_pair_is_verified_once(keypoints, config: MatchConfig, chunk: int) -> None:
    """Both images of a pair are queried and find each other: the pair is verified once, one edge."""
    index, features, _ = _stored_in_two_runs(keypoints)
    verifier = RecordingVerifier(config.verify, keypoints)
    matcher = Matcher(config, index, features, verifier)
    matches = matcher.match_stored(sorted(VECTORS), chunk=chunk)
    assert _pairs(matches) == COPIES and len(matches) == len(COPIES)
    assert set(verifier.pairs) == {frozenset(p) for p in COPIES}  # only candidates above the similarity bound
    assert max(verifier.pairs.values()) == 1, verifier.pairs


# ----------------------------------------------------------------------------- store reads through ``call``


class FlakyIndex(RecordingIndex):
    """Fails the ``nth`` call of ``method`` once, as the Milvus adapter reports an outage."""

    def __init__(self, dim: int, method: str, nth: int) -> None:
        super().__init__(dim)
        self.calls: Counter[str] = Counter()
        self.method, self.nth = method, nth

    def __getattribute__(self, name: str):
        attr = super().__getattribute__(name)
        if name in ("vectors", "candidates_many", "stored_before"):
            self.calls[name] += 1
            if name == self.method and self.calls[name] == self.nth:
                raise DependencyDown("milvus", f"{name} timed out")
        return attr


class FlakyFeatures(MemoryFeatureStore):
    """Fails the first read of ``image_id``'s keypoints once, as the S3 adapter reports an outage."""

    def __init__(self, image_id: int) -> None:
        super().__init__()
        self.image_id, self.failed = image_id, False

    def get_keypoints(self, image_id: int) -> Keypoints | None:
        if image_id == self.image_id and not self.failed:
            self.failed = True
            raise DependencyDown("s3", "GetObject timed out")
        return super().get_keypoints(image_id)


def _retrying(failed: list[str]):
    def call(fn):
        while True:
            try:
                return fn()
            except DependencyDown as exc:
                failed.append(exc.dependency)
    return call


def test_a_failed_index_read_is_retried_alone_without_verifying_again(keypoints, config: MatchConfig) -> None:
    """Chunks of one image: the third chunk's candidate search fails once; only it is repeated,
    the pairs the first two chunks verified are not verified again."""
    index, features = FlakyIndex(DIM, "candidates_many", 3), MemoryFeatureStore()
    _store(index, features, keypoints, OLD + NEW)
    verifier = RecordingVerifier(config.verify, keypoints)
    failed: list[str] = []
    matches = Matcher(config, index, features, verifier).match_stored(sorted(VECTORS), chunk=1,
                                                                      call=_retrying(failed))
    assert _pairs(matches) == COPIES and failed == ["milvus"]
    assert index.calls["candidates_many"] == len(VECTORS) + 1 and index.calls["vectors"] == len(VECTORS)
    assert max(verifier.pairs.values()) == 1, verifier.pairs


def test_the_match_worker_retries_each_failed_read_under_its_dependency(keypoints, config: MatchConfig,
                                                                        tmp_path) -> None:
    from prometheus_client import CollectorRegistry
    from test_poison import AckingProducer, ListConsumer, record

    from memetrace.matcher.metrics import MatchMetrics
    from memetrace.matcher.worker import MatchWorker
    from memetrace.messages import ImageEvent, PostRef

    s = make_settings(tmp_path, retry_max_s=0.02)
    index, features = FlakyIndex(DIM, "vectors", 1), FlakyFeatures(CAT)
    _store(index, features, keypoints, OLD + NEW)
    verifier = RecordingVerifier(config.verify, keypoints)
    events = [record(n, ImageEvent(image_id=i, nb_points=len(keypoints[i]),
                                   post=PostRef(post_id=f"p{i}", posted_at=-1, platform="x")).to_bytes(),
                     topic=s.kafka_images_topic) for n, i in enumerate(sorted(VECTORS))]
    producer = AckingProducer()
    worker = MatchWorker(s, Matcher(config, index, features, verifier), MatchMetrics(CollectorRegistry()),
                         producer, ListConsumer(events))
    worker.run(max_idle=0.3)
    edges = {(e["a"], e["b"]) for e in (json.loads(v) for _, _, v, _ in producer.on(s.kafka_matches_topic))}
    assert edges == COPIES
    retries = {d: worker.metrics.registry.get_sample_value("memetrace_retries_total", {"target": d})
               for d in ("milvus", "s3", "batch")}
    assert retries == {"milvus": 1, "s3": 1, "batch": None}, retries
    assert index.calls["candidates_many"] == 1 and index.calls["vectors"] == 2  # only the failed read again
    assert max(verifier.pairs.values()) == 1, verifier.pairs


def test_verify_pairs_checks_the_pairs_asked_whatever_the_candidates(keypoints, config: MatchConfig) -> None:
    """What derivation trees ask: every given pair verified, the first id as the query, with its
    geometry (sizes read from the index where not given); pairs no search would offer included."""
    index, features = MemoryVectorIndex(DIM), MemoryFeatureStore()
    _store(index, features, keypoints, OLD + NEW)
    found = Matcher(config, index, features).verify_pairs([(COFFEE, COFFEE_CROP), (CAT, COINS), (ASTRONAUT, 99)],
                                                          {COFFEE: (keypoints[COFFEE].width, keypoints[COFFEE].height)})
    assert [(m.a, m.b) for m in found] == [(COFFEE, COFFEE_CROP)]
    geo = found[0].geometry
    assert geo is not None and geo.size_b == (keypoints[COFFEE_CROP].width, keypoints[COFFEE_CROP].height)
    # a -> b: the whole crop (b) is a part of the coffee (a)
    assert geo.box_b == (0, 0, *geo.size_b) and geo.cover_b > 0.9 > 0.7 > geo.cover_a


def test_the_keypoint_cache_is_bounded_by_the_setting_in_bytes(keypoints, tmp_path) -> None:
    """MEMETRACE_MATCH_CACHE_MB reaches the matcher's cache, which keeps prepared keypoints by their
    bytes: a budget of about two images keeps the two used last, whatever their count of points."""
    assert MatchConfig.from_settings(make_settings(tmp_path, match_cache_mb=3)).cache_bytes == 3 * 2**20
    index, features = MemoryVectorIndex(DIM), MemoryFeatureStore()
    _store(index, features, keypoints, OLD + NEW)
    sizes = {i: Prepared(keypoints[i]).nbytes + ENTRY_BYTES for i in (CAT, COFFEE, COINS)}
    config = MatchConfig.from_settings(make_settings(tmp_path))
    matcher = Matcher(replace(config, cache_bytes=sizes[COFFEE] + sizes[COINS]), index, features)
    for i in (CAT, COFFEE, COINS):
        matcher.prepared(i)
    assert matcher._prepared.nbytes == sizes[COFFEE] + sizes[COINS]
    assert [matcher._prepared.get(i)[0] for i in (CAT, COFFEE, COINS)] == [False, True, True]
    assert matcher.prepared(99) is None and matcher._prepared.get(99) == (True, None)  # no keypoints: kept as such
