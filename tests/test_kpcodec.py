"""The keypoint codec (memetrace.kpcodec): sizes, what pq16 keeps of real SIFT, keypoint sizes and
format 1 (none stored), refusals, and the bytes a packed local store takes per image for real photos."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from conftest import rgb, sift_config
from memetrace.cli.footprint import disk_bytes
from memetrace.feature_store import LocalFeatureStore
from memetrace.imageio import make_thumbnail
from memetrace.keypoints import KeypointExtractor, Keypoints
from memetrace.keypoints import rootsift
from memetrace.kpcodec import KeypointCodec, KeypointFormatError


@pytest.fixture(scope="module")
def sift(photos: dict[str, Image.Image]) -> dict[str, Keypoints]:
    extractor = KeypointExtractor(sift_config())
    return {name: extractor.extract(rgb(im)) for name, im in photos.items()}


def test_a_keypoint_takes_21_bytes_in_pq16_and_133_raw(sift: dict[str, Keypoints]) -> None:
    kp = next(iter(sift.values()))
    header = len(KeypointCodec("pq16").encode(Keypoints(kp.xy[:0], kp.desc[:0], kp.width, kp.height)))
    assert len(KeypointCodec("pq16").encode(kp)) == header + 21 * len(kp)
    assert len(KeypointCodec("raw").encode(kp)) == header + 133 * len(kp)


def test_sizes_come_back_within_a_step_and_unknown_ones_as_none(sift: dict[str, Keypoints]) -> None:
    codec = KeypointCodec("pq16")
    for name, kp in sift.items():
        back = codec.decode(codec.encode(kp))
        assert kp.size is not None and back.size is not None and kp.size.min() > 1.5, name
        np.testing.assert_allclose(back.size, kp.size, rtol=2 ** (1 / 64) - 1 + 1e-6)
    kp = next(iter(sift.values()))
    assert codec.decode(codec.encode(Keypoints(kp.xy, kp.desc, kp.width, kp.height))).size is None


def test_format_1_blobs_read_without_sizes(sift: dict[str, Keypoints]) -> None:
    """A store written before sizes were kept: header version 1, then x, y and the descriptors."""
    kp = next(iter(sift.values()))
    blob = KeypointCodec("raw").encode(kp)
    n, head = len(kp), len(KeypointCodec("raw").encode(Keypoints(kp.xy[:0], kp.desc[:0], kp.width, kp.height)))
    v1 = bytearray(blob[:head] + blob[head:head + 4 * n] + blob[head + 5 * n:])
    struct.pack_into("<B", v1, 3, 1)
    back = KeypointCodec().decode(bytes(v1))
    assert back.size is None
    np.testing.assert_array_equal(back.desc, kp.desc)
    np.testing.assert_allclose(back.xy, kp.xy, atol=max(kp.width, kp.height) / 65535)


def test_pq16_keeps_each_descriptor_nearest_to_itself(sift: dict[str, Keypoints]) -> None:
    """What matching needs: a decoded descriptor is still closest to its own original (ratio test
    neighbours), on real SIFT of the packaged photos."""
    codec = KeypointCodec("pq16")
    for name, kp in sift.items():
        back = codec.decode(codec.encode(kp))
        a, b = rootsift(kp.desc), rootsift(back.desc)
        assert float((a * b).sum(axis=1).mean()) > 0.9, name
        nearest = (b @ a.T).argmax(axis=1)
        assert (nearest == np.arange(len(kp))).mean() > 0.85, name
        np.testing.assert_allclose(back.xy, kp.xy, atol=max(kp.width, kp.height) / 65535)


def test_every_coding_is_read_whatever_the_codec_writes(sift: dict[str, Keypoints]) -> None:
    kp = next(iter(sift.values()))
    raw = KeypointCodec("raw").encode(kp)
    np.testing.assert_array_equal(KeypointCodec("pq16").decode(raw).desc, kp.desc)


def test_other_versions_are_refused_in_one_line() -> None:
    blob = bytearray(KeypointCodec("raw").encode(Keypoints(np.zeros((0, 2)), np.zeros((0, 128)), 4, 4)))
    struct.pack_into("<B", blob, 3, 9)  # the version byte
    refusal = "keypoints/x: keypoint format 9.0, this memetrace reads formats 1-2,"
    with pytest.raises(KeypointFormatError, match=refusal) as err:
        KeypointCodec().decode(bytes(blob), "keypoints/x")
    assert "\n" not in str(err.value)


def test_packed_store_bytes_per_image_are_bounded(tmp_path, photos: dict[str, Image.Image],
                                                  sift: dict[str, Keypoints]) -> None:
    """Keypoints (pq16) and a 160 px thumbnail of each packaged photo: allocated bytes per image."""
    store = LocalFeatureStore(tmp_path / "f")
    store.codec = KeypointCodec("pq16")
    for i, (name, im) in enumerate(photos.items()):
        store.put_keypoints(i, sift[name])
        store.put_thumbnail(i, make_thumbnail(rgb(im), 160))
    store.close()  # the write-ahead log is checkpointed into the files
    n = len(photos)
    points = sum(len(k) for k in sift.values()) / n
    kp_bytes = sum(disk_bytes(tmp_path / "f" / f"keypoints.db{s}") for s in ("", "-wal", "-shm")) / n
    assert kp_bytes < 21 * points + 1024 + 256  # the codes, half a page of slack, the key
    assert sum(disk_bytes(tmp_path / "f" / f"thumbnails.db{s}") for s in ("", "-wal", "-shm")) / n < 8 * 1024
