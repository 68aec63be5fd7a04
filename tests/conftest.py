"""Shared fixtures: real photos (scikit-image's bundled samples, never the network), clean
settings, one Embedder for the whole test session (loading the model costs ~2 s), and one Milvus
standalone server for the session (~3 s to start; ~6 s the first time, unpacking its binaries)."""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from memetrace.cli.demo import DISTRACTOR_PHOTOS, GROUP_PHOTOS, photo_dir
from memetrace.keypoints import SiftConfig
from memetrace.settings import Settings

PHOTO_SIDE = 480  # the demo corpus' working size: fast, and far above min_side


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings from defaults only: no MEMETRACE_* variable and no .env file leaks in."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.upper().startswith("MEMETRACE_"):
                mp.delenv(key)
        return Settings(_env_file=None, data_dir=data_dir, **overrides)


def sift_config(**changes: Any) -> SiftConfig:
    """The SIFT settings' defaults, with ``changes``."""
    return dataclasses.replace(SiftConfig.from_settings(Settings.model_construct()), **changes)


def load_photo(name: str) -> Image.Image:
    """A bundled sample photo (group or distractor name) as RGB, longest side <= PHOTO_SIDE."""
    files = {**GROUP_PHOTOS, **DISTRACTOR_PHOTOS}
    with Image.open(photo_dir() / files[name]) as f:
        im = f.convert("RGB")
    im.thumbnail((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS)
    return im


def rgb(im: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def jpeg_roundtrip(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as f:
        return f.convert("RGB")


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    return {name: load_photo(name) for name in (*GROUP_PHOTOS, *DISTRACTOR_PHOTOS)}


@pytest.fixture(scope="session")
def session_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("session-data"))


@pytest.fixture(scope="session")
def embedder(session_settings: Settings):
    """The CPU embedder with the packaged EfficientNet-Lite0 weights, built once."""
    from memetrace.embedder import EmbedConfig, Embedder

    return Embedder(EmbedConfig.from_settings(session_settings.model_copy(update={"device": "cpu"})))


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MEMETRACE_* variable, and a working directory without a .env file."""
    for key in list(os.environ):
        if key.upper().startswith("MEMETRACE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def milvus_server_uri() -> Iterator[str]:
    """A real Milvus server (2.3 standalone, not Lite) shared by the session: its http:// URI. Tests
    isolate themselves with a collection prefix of their own."""
    from benchmarks.services import MILVUS_STOP_GRACE, milvus_server_unavailable, start_milvus_server, stop_process

    if reason := milvus_server_unavailable():
        pytest.skip(f"cannot start a Milvus server here: {reason}")
    # not under pytest's kept temp dirs: etcd and RocksMQ preallocate ~270 MB
    with tempfile.TemporaryDirectory(prefix="memetrace-milvus-") as data_dir:
        proc, uri = start_milvus_server(Path(data_dir))
        try:
            yield uri
        finally:
            stop_process(proc, MILVUS_STOP_GRACE)


@pytest.fixture(params=["sqlite", "memory"])
def graph_state(request: pytest.FixtureRequest, tmp_path: Path):
    """The clusterer's GraphState on each backend: contract and clusterer tests run on both."""
    from memetrace.clusterer.state import MemoryGraphState, SqliteGraphState

    state = SqliteGraphState(tmp_path / "deep" / "state.db") if request.param == "sqlite" else MemoryGraphState()
    yield state
    state.close()
