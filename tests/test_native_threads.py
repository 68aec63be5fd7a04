"""memetrace.native_threads: BLAS on one thread once the composition root loads a component,
restored when it closes, and left alone when the user chose a thread count."""

from __future__ import annotations

from pathlib import Path

import numpy  # noqa: F401 - loads numpy's OpenBLAS, the one the keypoint codec's matrices use
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from memetrace.cli.context import Context
from memetrace.native_threads import USER_SETTINGS, single_threaded_blas
from memetrace.settings import Settings


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads(monkeypatch: pytest.MonkeyPatch):
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with threadpool_limits(limits=2, user_api="blas"):
        if set(blas_threads()) != {2}:
            pytest.skip("this machine's BLAS will not run 2 threads: one thread is all there is to set")
        yield


def test_single_threaded_blas_and_its_undo(two_blas_threads) -> None:
    undo = single_threaded_blas()
    assert set(blas_threads()) == {1}
    undo()
    assert set(blas_threads()) == {2}


@pytest.mark.parametrize("name", USER_SETTINGS)
def test_a_thread_count_the_user_set_wins(two_blas_threads, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "2")
    single_threaded_blas()
    assert set(blas_threads()) == {2}


def test_the_context_limits_blas_while_open(two_blas_threads, tmp_path: Path) -> None:
    ctx = Context(Settings(_env_file=None, data_dir=tmp_path))
    ctx.features  # noqa: B018 - loads the feature store (the keypoint codec's numpy)
    assert set(blas_threads()) == {1}
    ctx.close()
    assert set(blas_threads()) == {2}
