"""One FeatureStore contract, run against every backend (local directory, memory, S3), plus the
S3 backend's own behaviour: bucket creation, clear errors for a wrong endpoint or wrong
credentials, and Context choosing it from settings.

S3 is a real S3-compatible HTTP server: moto's server mode, started in-process on 127.0.0.1 with a
free port. No traffic leaves the loopback interface.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server")

from memetrace.cli.context import Context  # noqa: E402
from memetrace.feature_store import FeatureStore, LocalFeatureStore, MemoryFeatureStore  # noqa: E402
from memetrace.keypoints import Keypoints  # noqa: E402
from memetrace.s3_feature_store import S3FeatureStore, S3FeatureStoreError, make_client  # noqa: E402
from memetrace.settings import Settings  # noqa: E402
from conftest import make_settings  # noqa: E402

ACCESS_KEY = "memetrace-test"
SECRET_KEY = "memetrace-test-secret"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")  # never send loopback traffic to a proxy
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def s3_settings(tmp_path: Path, endpoint: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        feature_store="s3", s3_endpoint_url=endpoint, s3_bucket=f"mt-{uuid.uuid4().hex[:12]}",
        s3_access_key_id=ACCESS_KEY, s3_secret_access_key=SECRET_KEY,
        s3_connect_timeout=2.0, s3_read_timeout=10.0, s3_max_attempts=2,
    )
    values.update(overrides)
    return make_settings(tmp_path, **values)


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One client built by make_client, shared (building one costs ~0.5 s of CPU)."""
    return make_client(s3_settings(tmp_path_factory.mktemp("s3"), s3_endpoint))


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> FeatureStore:
    """Each backend, empty; S3 gets a fresh bucket, created by the store itself."""
    if request.param == "local":
        return LocalFeatureStore(tmp_path / "features")
    if request.param == "memory":
        return MemoryFeatureStore()
    endpoint = request.getfixturevalue("s3_endpoint")
    client = request.getfixturevalue("s3_client")
    return S3FeatureStore.from_settings(s3_settings(tmp_path, endpoint), client=client)


def random_keypoints(n: int, seed: int = 0, width: int = 480, height: int = 320) -> Keypoints:
    rng = np.random.default_rng(seed)
    xy = (rng.random((n, 2)) * [width, height]).astype(np.float32)
    desc = rng.integers(0, 256, size=(n, 128), dtype=np.uint8)
    return Keypoints(xy=xy, desc=desc, width=width, height=height)


def jpeg_bytes(colour: tuple[int, int, int], side: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --- the contract: every backend ----------------------------------------------------------


def test_keypoints_round_trip_keeps_values_and_dtypes(store: FeatureStore) -> None:
    kp = random_keypoints(300, seed=1)
    store.put_keypoints(42, kp)
    got = store.get_keypoints(42)
    assert got is not None
    assert got.xy.dtype == np.float32 and got.xy.shape == (300, 2)
    assert got.desc.dtype == np.uint8 and got.desc.shape == (300, 128)
    np.testing.assert_allclose(got.xy, kp.xy, atol=480 / 65535)  # 16-bit fixed point (memetrace.kpcodec)
    np.testing.assert_array_equal(got.desc, kp.desc)  # the stores' default coding is lossless
    assert (got.width, got.height) == (480, 320)
    assert type(got.width) is int and type(got.height) is int


def test_keypoints_other_dtypes_are_stored_as_float32_and_uint8(store: FeatureStore) -> None:
    xy = np.array([[1.25, 2.5], [100.75, 200.125]], dtype=np.float64)
    desc = np.arange(256, dtype=np.int64).reshape(2, 128)
    store.put_keypoints(7, Keypoints(xy=xy, desc=desc, width=640, height=480))
    got = store.get_keypoints(7)
    assert got is not None
    assert got.xy.dtype == np.float32 and got.desc.dtype == np.uint8
    np.testing.assert_allclose(got.xy, xy.astype(np.float32), atol=640 / 65535)
    np.testing.assert_array_equal(got.desc, desc.astype(np.uint8))


def test_empty_keypoints_round_trip(store: FeatureStore) -> None:
    empty = Keypoints(xy=np.zeros((0, 2), np.float32), desc=np.zeros((0, 128), np.uint8),
                      width=32, height=48)
    store.put_keypoints(3, empty)
    got = store.get_keypoints(3)
    assert got is not None and len(got) == 0
    assert got.xy.shape == (0, 2) and got.desc.shape == (0, 128)
    assert (got.width, got.height) == (32, 48)


def test_thumbnail_round_trip(store: FeatureStore) -> None:
    jpeg = jpeg_bytes((200, 30, 60))
    store.put_thumbnail(5, jpeg)
    assert store.get_thumbnail(5) == jpeg
    with Image.open(io.BytesIO(store.get_thumbnail(5) or b"")) as im:
        assert im.format == "JPEG" and im.size == (40, 40)


def test_missing_keys_give_none_and_not_exists(store: FeatureStore) -> None:
    assert store.get_keypoints(999) is None
    assert store.get_thumbnail(999) is None
    assert store.get_bytes("keypoints/00/nothing-here.kpc") is None
    assert not store.exists(FeatureStore.keypoints_key(999))
    assert not store.exists(FeatureStore.thumbnail_key(999))
    store.put_thumbnail(999, jpeg_bytes((0, 0, 0)))  # a thumbnail does not make keypoints appear
    assert store.get_keypoints(999) is None
    assert not store.exists(FeatureStore.keypoints_key(999))


def test_exists_after_put(store: FeatureStore) -> None:
    store.put_keypoints(11, random_keypoints(5))
    store.put_thumbnail(12, jpeg_bytes((10, 20, 30)))
    assert store.exists(FeatureStore.keypoints_key(11))
    assert store.exists(FeatureStore.thumbnail_key(12))
    assert not store.exists(FeatureStore.thumbnail_key(11))
    assert not store.exists(FeatureStore.keypoints_key(12))


def test_remove_images_deletes_their_objects(store: FeatureStore) -> None:
    for i in (1, 2):
        store.put_thumbnail(i, b"jpeg")
        store.put_keypoints(i, random_keypoints(3))
    store.remove_images([1, 99])  # 99 has nothing stored: not an error
    assert not store.exists(store.thumbnail_key(1)) and not store.exists(store.keypoints_key(1))
    assert store.get_thumbnail(2) == b"jpeg" and store.exists(store.keypoints_key(2))


def test_overwrite_replaces_the_value(store: FeatureStore) -> None:
    store.put_keypoints(21, random_keypoints(10, seed=1))
    second = random_keypoints(4, seed=2, width=100, height=50)
    store.put_keypoints(21, second)
    got = store.get_keypoints(21)
    assert got is not None and len(got) == 4 and (got.width, got.height) == (100, 50)
    np.testing.assert_array_equal(got.desc, second.desc)

    store.put_thumbnail(21, jpeg_bytes((255, 0, 0)))
    blue = jpeg_bytes((0, 0, 255))
    store.put_thumbnail(21, blue)
    assert store.get_thumbnail(21) == blue


def test_raw_bytes_and_extreme_ids(store: FeatureStore) -> None:
    store.put_bytes("misc/empty.bin", b"")
    assert store.get_bytes("misc/empty.bin") == b""
    assert store.exists("misc/empty.bin")
    blob = bytes(range(256)) * 64
    store.put_bytes("misc/all-bytes.bin", bytearray(blob))
    assert store.get_bytes("misc/all-bytes.bin") == blob
    for image_id in (0, 2**63 - 1, 2**64 - 1):
        kp = random_keypoints(3, seed=image_id % 97)
        store.put_keypoints(image_id, kp)
        got = store.get_keypoints(image_id)
        assert got is not None
        np.testing.assert_array_equal(got.desc, kp.desc)


# --- S3 only -------------------------------------------------------------------------------


def raw_client(endpoint: str) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def bucket_exists(client: Any, bucket: str) -> bool:
    return any(b["Name"] == bucket for b in client.list_buckets().get("Buckets", []))


def test_bucket_is_created_when_missing_and_keys_use_the_prefix(s3_endpoint: str, tmp_path: Path) -> None:
    settings = s3_settings(tmp_path, s3_endpoint, s3_prefix="/deploy/features/")
    client = raw_client(s3_endpoint)
    assert not bucket_exists(client, settings.s3_bucket)

    store = S3FeatureStore.from_settings(settings)
    assert bucket_exists(client, settings.s3_bucket)
    store.put_keypoints(1, random_keypoints(5))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=settings.s3_bucket)["Contents"]]
    assert keys == ["deploy/features/" + FeatureStore.keypoints_key(1)]

    # A second store on the existing bucket (another worker, a restart) sees the same data.
    again = S3FeatureStore.from_settings(settings)
    got = again.get_keypoints(1)
    assert got is not None and len(got) == 5


def test_default_prefix_and_empty_prefix(s3_endpoint: str, tmp_path: Path) -> None:
    client = raw_client(s3_endpoint)
    default = s3_settings(tmp_path, s3_endpoint)
    assert default.s3_prefix == "features"
    S3FeatureStore.from_settings(default).put_thumbnail(2, b"jpeg")
    bare = s3_settings(tmp_path, s3_endpoint, s3_prefix="")
    S3FeatureStore.from_settings(bare).put_thumbnail(2, b"jpeg")
    assert client.get_object(Bucket=default.s3_bucket,
                             Key="features/" + FeatureStore.thumbnail_key(2))["Body"].read() == b"jpeg"
    assert client.get_object(Bucket=bare.s3_bucket,
                             Key=FeatureStore.thumbnail_key(2))["Body"].read() == b"jpeg"


def test_bucket_in_another_region_is_created(s3_endpoint: str, tmp_path: Path) -> None:
    settings = s3_settings(tmp_path, s3_endpoint, s3_region="eu-west-1")
    store = S3FeatureStore.from_settings(settings)
    assert raw_client(s3_endpoint).get_bucket_location(
        Bucket=settings.s3_bucket)["LocationConstraint"] == "eu-west-1"
    store.put_thumbnail(1, b"x")
    assert store.get_thumbnail(1) == b"x"


def test_client_can_be_passed_in(s3_endpoint: str) -> None:
    bucket = f"mt-{uuid.uuid4().hex[:12]}"
    store = S3FeatureStore(raw_client(s3_endpoint), bucket, "p")
    store.put_bytes("a/b", b"1")
    assert store.get_bytes("a/b") == b"1"
    assert store.object_key("a/b") == "p/a/b"


def test_wrong_endpoint_fails_fast_with_a_clear_error(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = s3_settings(tmp_path, endpoint, s3_connect_timeout=1.0, s3_max_attempts=1)
    start = time.monotonic()
    with pytest.raises(S3FeatureStoreError) as err:
        Context(settings).features
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "MEMETRACE_S3_ENDPOINT_URL" in msg and endpoint in msg


def test_retries_come_from_botocore_config(tmp_path: Path) -> None:
    settings = s3_settings(tmp_path, "http://127.0.0.1:9", s3_max_attempts=4, s3_connect_timeout=1.5)
    config = make_client(settings).meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}  # first try included
    assert config.connect_timeout == 1.5
    assert config.s3 == {"addressing_style": "path"}


@contextmanager
def moto_auth_enforced(endpoint: str) -> Iterator[None]:
    """Make the moto server check credentials (it accepts any by default), then restore it."""

    def post(value: str) -> dict[str, Any]:
        req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=value.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})  # not form data
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    previous = post("0")["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        yield
    finally:
        post(previous)


def test_wrong_credentials_name_the_settings(s3_endpoint: str, tmp_path: Path) -> None:
    settings = s3_settings(tmp_path, s3_endpoint, s3_access_key_id="AKIAWRONGWRONGWRONG1",
                           s3_secret_access_key="not-the-secret", s3_max_attempts=1)
    with moto_auth_enforced(s3_endpoint), pytest.raises(S3FeatureStoreError) as err:
        S3FeatureStore.from_settings(settings)
    msg = str(err.value)
    assert "MEMETRACE_S3_ACCESS_KEY_ID" in msg and "MEMETRACE_S3_SECRET_ACCESS_KEY" in msg
    assert settings.s3_bucket in msg and "InvalidAccessKeyId" in msg
    assert "not-the-secret" not in msg


def test_half_configured_credentials_are_refused(tmp_path: Path) -> None:
    settings = s3_settings(tmp_path, "http://127.0.0.1:9", s3_secret_access_key=None)
    with pytest.raises(S3FeatureStoreError, match="MEMETRACE_S3_SECRET_ACCESS_KEY"):
        make_client(settings)


def test_empty_bucket_name_is_refused(s3_endpoint: str, tmp_path: Path) -> None:
    with pytest.raises(S3FeatureStoreError, match="MEMETRACE_S3_BUCKET"):
        S3FeatureStore.from_settings(s3_settings(tmp_path, s3_endpoint, s3_bucket=""))


def test_context_picks_the_backend_from_settings(s3_endpoint: str, tmp_path: Path) -> None:
    s3 = Context(s3_settings(tmp_path, s3_endpoint)).features
    assert isinstance(s3, S3FeatureStore)
    s3.put_keypoints(9, random_keypoints(8))
    got = s3.get_keypoints(9)
    assert got is not None and len(got) == 8

    local = Context(make_settings(tmp_path)).features
    assert isinstance(local, LocalFeatureStore)
    assert local.root == tmp_path / "features"


def test_s3_settings_from_the_environment(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "MEMETRACE_FEATURE_STORE": "s3",
        "MEMETRACE_S3_ENDPOINT_URL": "http://minio:9000",
        "MEMETRACE_S3_BUCKET": "memes",
        "MEMETRACE_S3_PREFIX": "prod/features",
        "MEMETRACE_S3_REGION": "eu-central-1",
        "MEMETRACE_S3_ACCESS_KEY_ID": "minio-user",
        "MEMETRACE_S3_SECRET_ACCESS_KEY": "minio-password",
        "MEMETRACE_S3_MAX_ATTEMPTS": "3",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert (s.feature_store, s.s3_endpoint_url, s.s3_bucket, s.s3_prefix, s.s3_region) == (
        "s3", "http://minio:9000", "memes", "prod/features", "eu-central-1")
    assert s.s3_access_key_id == "minio-user" and s.s3_max_attempts == 3
    assert s.s3_secret_access_key is not None
    assert s.s3_secret_access_key.get_secret_value() == "minio-password"
    assert "minio-password" not in repr(s) and "minio-password" not in str(s.model_dump())


def test_defaults_stay_local(clean_env: None) -> None:
    s = Settings()
    assert s.feature_store == "local" and s.s3_secret_access_key is None
    assert os.environ.get("MEMETRACE_FEATURE_STORE") is None
