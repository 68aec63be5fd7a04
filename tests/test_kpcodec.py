"""The keypoint codec (memetrace.kpcodec): sizes, what pq16 keeps of real SIFT, refusals, and the
bytes a packed local store takes per image for real photos."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from conftest import rgb
from memetrace.cli.footprint import disk_bytes
from memetrace.feature_store import LocalFeatureStore
from memetrace.imageio import make_thumbnail
from memetrace.keypoints import KeypointExtractor, Keypoints
from memetrace.keypoints import rootsift
from memetrace.kpcodec import KeypointCodec, KeypointFormatError


@pytest.fixture(scope="module")
def sift(photos: dict[str, Image.Image]) -> dict[str, Keypoints]:
    extractor = KeypointExtractor(600, 448, 0.35)
    return {name: extractor.extract(rgb(im)) for name, im in photos.items()}


def test_a_keypoint_takes_20_bytes_in_pq16_and_132_raw(sift: dict[str, Keypoints]) -> None:
    kp = next(iter(sift.values()))
    header = len(KeypointCodec("pq16").encode(Keypoints(kp.xy[:0], kp.desc[:0], kp.width, kp.height)))
    assert len(KeypointCodec("pq16").encode(kp)) == header + 20 * len(kp)
    assert len(KeypointCodec("raw").encode(kp)) == header + 132 * len(kp)


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
    with pytest.raises(KeypointFormatError, match="keypoints/x: keypoint format 9") as err:
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
    assert kp_bytes < 20 * points + 1024 + 256  # the codes, half a page of slack, the key
    assert sum(disk_bytes(tmp_path / "f" / f"thumbnails.db{s}") for s in ("", "-wal", "-shm")) / n < 8 * 1024
