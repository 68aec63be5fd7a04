"""memetrace.cli.demo: the demo corpus is complete, consistent with its ground truth, and reproducible."""

from __future__ import annotations

import csv
import shutil
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from memetrace.cli.demo import (
    BAD_FILES,
    COPIES_PER_PHOTO,
    CSV_COLUMNS,
    DISTRACTOR_PHOTOS,
    GROUP_PHOTOS,
    TRANSFORMS,
    make_demo_corpus,
)
from memetrace.imageio import BadImage, DecodeLimits, decode
from memetrace.settings import Settings


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the demo corpus must not touch the network")


def _rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "ground_truth.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def _files(images: Path) -> dict[str, bytes]:
    return {f"images/{p.name}": p.read_bytes() for p in sorted(images.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """(out_dir, images folder, seconds it took), built once with the network cut off."""
    out_dir = tmp_path_factory.mktemp("demo") / "corpus"  # not there yet: the demo must create it
    skimage_was_imported = "skimage" in sys.modules
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        start = time.perf_counter()
        images = make_demo_corpus(out_dir, seed=0)
        elapsed = time.perf_counter() - start
    if not skimage_was_imported:  # the photos are read from the package folder: skimage stays unimported
        assert "skimage" not in sys.modules and "pooch" not in sys.modules
    return out_dir, images, elapsed


def test_corpus_is_created_small_and_fast(corpus: tuple[Path, Path, float]) -> None:
    out_dir, images, elapsed = corpus
    assert images == out_dir / "images" and images.is_dir()
    assert (out_dir / "ground_truth.csv").is_file()
    files = list(images.iterdir())
    n_photos = len(GROUP_PHOTOS) + len(DISTRACTOR_PHOTOS)
    assert 6 <= n_photos <= 10
    assert len(files) == len(GROUP_PHOTOS) * (1 + COPIES_PER_PHOTO) + len(DISTRACTOR_PHOTOS) + len(BAD_FILES)
    assert sum(p.stat().st_size for p in files) < 5_000_000
    assert elapsed < 3.0


def test_ground_truth_rows_match_files(corpus: tuple[Path, Path, float]) -> None:
    out_dir, images, _ = corpus
    rows = _rows(out_dir)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths))
    assert set(paths) == {f"images/{p.name}" for p in images.iterdir()}
    for r in rows:
        assert r["path"].startswith("images/") and (out_dir / r["path"]).is_file()
        assert r["role"] in {"original", "copy", "distractor", "bad"}
        assert (r["group_id"] != "") == (r["role"] in {"original", "copy"})
        if r["role"] == "copy":
            assert r["transform"] in TRANSFORMS
        elif r["role"] != "bad":
            assert r["transform"] == "none"


def test_every_group_has_its_original_and_copies(corpus: tuple[Path, Path, float]) -> None:
    rows = _rows(corpus[0])
    groups = {r["group_id"] for r in rows if r["group_id"]}
    assert groups == set(GROUP_PHOTOS)
    for g in groups:
        roles = Counter(r["role"] for r in rows if r["group_id"] == g)
        assert roles == {"original": 1, "copy": COPIES_PER_PHOTO}
        kinds = [r["transform"] for r in rows if r["group_id"] == g and r["role"] == "copy"]
        assert len(set(kinds)) == len(kinds)  # no two copies of one photo the same way
    # across the corpus every transform kind is shown
    assert {r["transform"] for r in rows if r["role"] == "copy"} == set(TRANSFORMS)
    assert sum(r["role"] == "distractor" for r in rows) == len(DISTRACTOR_PHOTOS) >= 2


def test_every_file_decodes_as_ground_truth_says(corpus: tuple[Path, Path, float]) -> None:
    """Photos decode with the default guards; bad files fail with the reason the CSV names."""
    out_dir, _, _ = corpus
    limits = DecodeLimits.from_settings(Settings())
    by_id: dict[int, str] = {}
    for r in _rows(out_dir):
        data = (out_dir / r["path"]).read_bytes()
        if r["role"] == "bad":
            with pytest.raises(BadImage) as info:
                decode(data, limits)
            assert info.value.reason == r["transform"]
            continue
        img = decode(data, limits)
        assert min(img.height, img.width) >= 100
        assert img.image_id not in by_id, f"{r['path']} has the same bytes as {by_id.get(img.image_id)}"
        by_id[img.image_id] = r["path"]
    assert {r["transform"] for r in _rows(out_dir) if r["role"] == "bad"} == {"empty", "not_an_image"}


def test_same_seed_same_bytes(corpus: tuple[Path, Path, float], tmp_path: Path) -> None:
    out_dir, images, _ = corpus
    again = make_demo_corpus(tmp_path / "again", seed=0)
    assert _files(again) == _files(images)
    assert (tmp_path / "again" / "ground_truth.csv").read_bytes() == (out_dir / "ground_truth.csv").read_bytes()


def test_other_seed_rebuilt_in_place_leaves_no_stale_files(corpus: tuple[Path, Path, float], tmp_path: Path) -> None:
    out_dir, images, _ = corpus
    reused = tmp_path / "reused"
    shutil.copytree(out_dir, reused)
    (reused / "images" / "mine.txt").write_text("not the demo's")  # a file the demo did not make stays
    new_images = make_demo_corpus(reused, seed=1)
    rows = _rows(reused)
    assert {r["path"] for r in rows} | {"images/mine.txt"} == set(_files(new_images))
    stale = set(_files(images)) - set(_files(new_images))
    assert stale, "seed 1 should name its copies differently from seed 0 (another transform order)"
    assert all(r["path"] not in stale for r in rows)
