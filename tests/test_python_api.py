"""The Python API (``memetrace.open`` -> memetrace.cli.library.Library) on part of the demo corpus:
index, query by path, bytes, array and PIL image, clusters and members tables, pandas, export,
remove and prune, close. The stores are the default ones (Milvus Lite and SQLite in the data dir);
the session's embedder is handed in (the model loads once)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import memetrace
from memetrace.cli.context import Context
from memetrace.cli.demo import make_demo_corpus
from memetrace.cli.library import Library, QueryResult, Table
from memetrace.clusterer.export import CSV_COLUMNS
from memetrace.imageio import BadImage
from tests.conftest import make_settings

GROUPS = ("astronaut", "rocket")
OTHERS = ("hubble.jpg", "empty.jpg", "notes.png")  # a distractor, two bad files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the indexed folder: two groups of six, a distractor, two bad files; the whole demo corpus)."""
    base = tmp_path_factory.mktemp("pyapi")
    demo = make_demo_corpus(base / "demo")
    folder = base / "images"
    folder.mkdir()
    for p in demo.iterdir():
        if p.name.startswith(GROUPS) or p.name in OTHERS:
            shutil.copy(p, folder / p.name)
    return folder, demo


@pytest.fixture(scope="module")
def indexed(corpus: tuple[Path, Path], embedder, tmp_path_factory: pytest.TempPathFactory):
    """(the library, the summary of indexing the folder)."""
    library = Library(Context(make_settings(tmp_path_factory.mktemp("pyapi-data")), embedder=embedder))
    summary = library.index(corpus[0])
    yield library, summary
    library.close()


@pytest.fixture()
def lib(indexed: tuple[Library, dict]) -> Library:
    return indexed[0]


def _files_of(group: str, folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(group)}


def _cluster_of(lib: Library, path: str) -> int:
    return next(r["cluster_id"] for r in lib.members() if r["path"] == path)


def test_index_returns_the_summary(indexed: tuple[Library, dict]) -> None:
    s = indexed[1]
    assert (s["inputs"], s["new_images"], s["bad_inputs"]) == (15, 13, {"empty": 1, "not_an_image": 1})
    assert s["clusters"] == 2


def test_members_are_the_csv_rows(lib: Library, corpus: tuple[Path, Path]) -> None:
    members = lib.members()
    assert members.columns == tuple(CSV_COLUMNS)
    assert len(members) == 13 and {r["path"] for r in members} == {
        p.name for p in corpus[0].iterdir() if p.name not in ("empty.jpg", "notes.png")}
    astronaut = _cluster_of(lib, "astronaut.jpg")
    assert set(lib.members(astronaut).column("path")) == _files_of("astronaut", corpus[0])
    assert len(lib.members(cluster_id=-5)) == 0


def test_clusters_list_the_groups_of_copies(lib: Library, corpus: tuple[Path, Path]) -> None:
    clusters = lib.clusters()
    assert clusters.columns == ("cluster_id", "images", "files", "quality", "paths")
    assert [(r["images"], r["files"]) for r in clusters] == [(6, 6), (6, 6)]
    by_paths = {frozenset(r["paths"]): r["cluster_id"] for r in clusters}
    assert set(by_paths) == {frozenset(_files_of(g, corpus[0])) for g in GROUPS}
    lone = lib.clusters(min_size=1)
    assert len(lone) == 3 and lone[-1]["paths"] == ["hubble.jpg"]


def test_query_by_path_bytes_array_and_pil_image(lib: Library, corpus: tuple[Path, Path], tmp_path: Path) -> None:
    with Image.open(corpus[0] / "astronaut.jpg") as f:
        crop = f.convert("RGB").crop((40, 20, 420, 400))  # a copy never indexed
    crop.save(tmp_path / "new copy.png")
    data = (tmp_path / "new copy.png").read_bytes()
    by_path, by_bytes = lib.query(tmp_path / "new copy.png"), lib.query(data)
    by_array, by_image = lib.query(np.asarray(crop)), lib.query(crop)
    astronaut = _cluster_of(lib, "astronaut.jpg")
    for r in (by_path, by_bytes, by_array, by_image):
        assert isinstance(r, QueryResult)
        assert {m.cluster_id for m in r.matches} == {astronaut}, r
        assert len(r.matches) >= 4 and r.best is not None and r.best.kind == "full" and r.best.inliers >= 20
    assert by_path.query == str(tmp_path / "new copy.png") and by_bytes.query == f"<{len(data)} bytes>"
    assert by_path.matches == by_bytes.matches and by_path.image_id == by_bytes.image_id
    assert by_array.query == "<RGB image 380x380>" and by_array.matches == by_image.matches
    assert repr(by_bytes).startswith(f"<QueryResult <{len(data)} bytes>: {len(by_bytes.matches)} copies, best: full")
    table = by_path.table()
    assert len(table) == len(by_path.matches) and table[0]["paths"] == by_path.best.paths
    assert table[0]["inliers"] == by_path.best.inliers


def test_query_an_indexed_file_is_identical_and_a_gray_array_works(lib: Library, corpus: tuple[Path, Path]) -> None:
    r = lib.query(str(corpus[0] / "rocket.jpg"))
    assert r.best is not None and r.best.kind == "identical" and r.best.image_id == r.image_id
    assert r.best.paths == ("rocket.jpg",) and r.best.cluster_id == _cluster_of(lib, "rocket.jpg")
    with Image.open(corpus[0] / "rocket.jpg") as f:
        gray = np.asarray(f.convert("L"))
    assert {m.cluster_id for m in lib.query(gray).matches} == {r.best.cluster_id}


def test_copies_of_an_indexed_image_are_its_file_query_less_itself(lib: Library, corpus: tuple[Path, Path]) -> None:
    from memetrace.matcher.stored import NotStored

    by_file = lib.query(str(corpus[0] / "rocket.jpg"))
    by_id = lib.copies(by_file.image_id)
    assert by_id.image_id == by_file.image_id and by_id.matches
    assert {m.image_id for m in by_id.matches} == {m.image_id for m in by_file.matches if m.kind != "identical"}
    with pytest.raises(NotStored):
        lib.copies(12345)


def test_query_an_unrelated_photo_finds_nothing(lib: Library, corpus: tuple[Path, Path]) -> None:
    assert lib.query((corpus[1] / "coffee.jpg").read_bytes()).matches == ()


def test_query_refuses_what_is_not_an_image(lib: Library) -> None:
    with pytest.raises(BadImage) as bad:
        lib.query(b"this is a text file\n")
    assert bad.value.reason == "not_an_image"
    with pytest.raises(TypeError, match="uint8"):
        lib.query(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="not int"):
        lib.query(42)


def test_bad_files_table(lib: Library) -> None:
    assert [(r["path"], r["reason"]) for r in lib.bad_files()] == [("empty.jpg", "empty"),
                                                                  ("notes.png", "not_an_image")]


def test_tables_go_to_pandas(lib: Library) -> None:
    pd = pytest.importorskip("pandas")
    members, clusters = lib.members(), lib.clusters()
    df = members.to_pandas()
    assert list(df.columns) == CSV_COLUMNS and len(df) == 13
    assert df.groupby("cluster_id").size().sort_values().tolist() == [1, 6, 6]
    assert pd.DataFrame(members.rows).equals(df) and pd.DataFrame(members).equals(df)
    assert clusters.to_pandas()["images"].tolist() == [6, 6]
    empty = lib.members(cluster_id=-5).to_pandas()
    assert list(empty.columns) == CSV_COLUMNS and empty.empty


def test_table_basics() -> None:
    t = Table(("a", "b"), [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}])
    assert len(t) == 2 and t[1] == {"a": 2, "b": "y"} and t[:1] == Table(("a", "b"), [{"a": 1, "b": "x"}])
    assert t.column("a") == [1, 2] and list(t) == t.rows
    with pytest.raises(KeyError, match="the columns are a, b"):
        t.column("c")
    assert repr(t).splitlines()[0].split() == ["a", "b"] and repr(t).endswith("[2 rows x 2 columns]")
    assert repr(Table(("a",), [])).endswith("[0 rows x 1 columns]")


def test_export_writes_what_members_show(lib: Library, tmp_path: Path) -> None:
    out = lib.export(tmp_path / "clusters.json")
    clusters = json.loads(out.read_text())["clusters"]
    assert [m["path"] for c in clusters for m in c["members"]] == lib.members().column("path")
    import pyarrow.parquet as pq

    assert pq.read_table(lib.export(tmp_path / "c.data", format="parquet")).to_pylist() == lib.members().rows


def test_stats(lib: Library) -> None:
    s = lib.stats()
    assert (s["images"], s["paths"], s["bad_files"], s["clusters"]) == (13, 13, 2, 2)


def test_progress_bars_only_when_asked(lib: Library, corpus: tuple[Path, Path],
                                       capfd: pytest.CaptureFixture[str]) -> None:
    assert lib.index(corpus[0])["new_images"] == 0  # nothing new: the run is quick
    assert "index" not in capfd.readouterr().err
    lib.index(corpus[0], progress=True)
    assert "index" in capfd.readouterr().err


def test_open_takes_settings_and_refuses_unknown_names(tmp_path: Path, clean_env: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with memetrace.open(tmp_path / "data", min_inliers=25) as opened:
        assert isinstance(opened, memetrace.Library) and opened.context.settings.min_inliers == 25
        assert opened.data_dir == tmp_path / "data" and len(opened.members()) == 0
        assert repr(opened) == f"<memetrace.Library data_dir='{tmp_path / 'data'}'>"
    assert repr(opened) == "<memetrace.Library closed>"
    with pytest.raises(RuntimeError, match="closed"):
        opened.members()
    with pytest.raises(TypeError, match="did you mean 'min_inliers'"):
        memetrace.open(tmp_path / "data", min_inlier=25)
    monkeypatch.setenv("MEMETRACE_DATA_DIR", str(tmp_path / "env-data"))
    with memetrace.open() as default:  # the CLI's data dir
        assert default.data_dir == tmp_path / "env-data"


def test_remove_and_prune_then_reopen(lib: Library, corpus: tuple[Path, Path], embedder) -> None:
    """Last: it changes the index. Removed and deleted files leave their cluster; a closed library
    reopened on the data dir finds what was kept."""
    folder = corpus[0]
    astronaut = _cluster_of(lib, "astronaut.jpg")
    summary = lib.remove(folder / "astronaut_crop.jpg")
    assert (summary["removed_paths"], summary["removed_images"]) == (1, 1)
    (folder / "rocket_mirror.jpg").unlink()
    assert lib.prune()["removed_images"] == 1
    assert len(lib.members(astronaut)) == 5 and "rocket_mirror.jpg" not in lib.members().column("path")
    settings = lib.context.settings
    lib.close()
    with Library(Context(settings, embedder=embedder)) as again:
        r = again.query(folder / "astronaut.jpg")
        assert r.best is not None and r.best.kind == "identical" and len(r.matches) == 5
