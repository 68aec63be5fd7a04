"""Keeping the index true to the folders (issue 15): what ``index`` accepts (folders, image files,
list files, several at once), the roots paths are shown relative to, files changed in place or
gone, ``remove`` / ``prune`` / ``reset`` / ``bad-files``, and the per-run flags of ``index``.

Each test indexes a few small photos into a data dir of its own (Milvus Lite, the session's
embedder); the listing rules run without any store."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from conftest import load_photo, make_settings
from memetrace.cli.batch import IndexOptions, prune, remove_paths, reset, run_index
from memetrace.cli.context import Context
from memetrace.cli.main import main
from memetrace.cli.tables import cluster_table, display_paths
from memetrace.errors import DependencyDown
from memetrace.ingest.sources import UnsupportedInput, Walk, iter_directory, kind_of

# ----------------------------------------------------------------------------- helpers


def save(im: Image.Image, path: Path, quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG", quality=quality)
    return path


def crop(im: Image.Image, frac: float = 0.85) -> Image.Image:
    w, h = im.size
    return im.crop((0, 0, int(w * frac), int(h * frac)))


def folder_with_copies(root: Path, *names: str) -> Path:
    """``<name>.jpg`` and a cropped copy ``<name>_crop.jpg`` of each photo: one cluster each."""
    for name in names:
        im = load_photo(name)
        save(im, root / f"{name}.jpg")
        save(crop(im), root / f"{name}_crop.jpg", quality=80)
    return root


@pytest.fixture()
def ctx(tmp_path: Path, embedder) -> Context:
    return Context(make_settings(tmp_path / "data"), embedder=embedder)


def invoke(data: Path, *args: str, embedder=None, input: str | None = None) -> Result:
    """The CLI in-process (the session's embedder); the root logger it reconfigures is put back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(main, ["--data-dir", str(data), *args], obj=embedder, input=input)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def shown_paths(c: Context) -> set[str]:
    return {r.path for r in cluster_table(c)}


def stored_everywhere(c: Context, image_id: int) -> dict[str, bool]:
    """Whether each store still holds the image."""
    return {"index": bool(c.index.existing([image_id])), "features": c.features.get_keypoints(image_id) is not None,
            "catalog": image_id in c.catalog.images(), "state": image_id in c.graph_state.images(),
            "board": bool(c.board.clusters_of([image_id]))}


def image_of(c: Context, name: str) -> int:
    return next(i for i, ps in display_paths(c.catalog).items() if name in ps)


# ----------------------------------------------------------------------------- what index accepts


def test_kind_of_decides_by_extension_then_content(tmp_path: Path) -> None:
    png = tmp_path / "photo.bin"
    load_photo("cat").save(png, format="PNG")  # an image under a name that does not say so
    (tmp_path / "urls").write_text("https://example.test/a.jpg\n# comment\n", encoding="utf-8")
    (tmp_path / "list.txt").write_text("a.jpg\n", encoding="utf-8")
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01\xfe\xff" * 100)
    save(load_photo("coins"), tmp_path / "coins.jpg")
    assert [kind_of(tmp_path / n) for n in ("photo.bin", "urls", "list.txt", "coins.jpg")] == \
        ["image", "list", "list", "image"]
    assert kind_of(tmp_path) == "folder"
    with pytest.raises(UnsupportedInput, match=r"blob\.dat: neither an image nor UTF-8 text; expected a folder, "
                                               r"an image file or a text file of paths/URLs"):
        kind_of(tmp_path / "blob.dat")
    with pytest.raises(UnsupportedInput, match="nowhere.jpg: no such file or folder"):
        kind_of(tmp_path / "nowhere.jpg")


def test_a_binary_file_is_refused_in_one_line_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "blob.dat").write_bytes(b"\x00\xff" * 50)
    result = invoke(tmp_path / "data", "index", str(tmp_path / "blob.dat"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 'blob.dat'}: neither an image nor UTF-8 text; "
                                                  "expected a folder, an image file or a text file of paths/URLs "
                                                  "(one per line)"]
    assert not (tmp_path / "data").exists()  # refused before any store was opened


def test_index_one_image_file(tmp_path: Path, embedder) -> None:
    one = save(load_photo("cat"), tmp_path / "pics" / "one.jpg")
    result = invoke(tmp_path / "data", "index", str(one), embedder=embedder)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["new_images"] == 1 and summary["paths"] == 1 and summary["bad_inputs"] == {}
    exported = invoke(tmp_path / "data", "export", "--out", str(tmp_path / "c.csv"))
    assert exported.exit_code == 0, exported.output
    with (tmp_path / "c.csv").open(newline="", encoding="utf-8") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == ["one.jpg"]  # relative to the image's folder


def test_index_several_paths_at_once(ctx: Context, tmp_path: Path) -> None:
    folder = folder_with_copies(tmp_path / "a", "coins")
    single = save(load_photo("cat"), tmp_path / "b" / "cat.jpg")
    listed = save(crop(load_photo("cat")), tmp_path / "c" / "sub" / "cat_crop.jpg")
    (tmp_path / "c" / "list.txt").write_text("sub/cat_crop.jpg\n", encoding="utf-8")
    summary = run_index(ctx, [folder, single, tmp_path / "c" / "list.txt"], show_progress=False)
    assert summary["new_images"] == 4 and summary["clusters"] == 2
    assert shown_paths(ctx) == {"coins.jpg", "coins_crop.jpg", "cat.jpg", "sub/cat_crop.jpg"}
    assert listed.exists()


# ----------------------------------------------------------------------------- roots


class _MilvusHeld(Context):
    """A context whose vector index cannot be opened (another process holds the data dir)."""

    @property
    def index(self):
        raise DependencyDown("milvus", "Open local milvus failed")


def test_a_failed_index_writes_nothing(tmp_path: Path, embedder) -> None:
    data = tmp_path / "data"
    first = folder_with_copies(tmp_path / "first", "coins")
    c = Context(make_settings(data), embedder=embedder)
    run_index(c, first, show_progress=False)
    before = (c.catalog.roots(), c.catalog.files(), shown_paths(c))
    other = folder_with_copies(tmp_path / "other", "cat")
    held = _MilvusHeld(make_settings(data), embedder=embedder)
    with pytest.raises(DependencyDown):
        run_index(held, other, show_progress=False)
    assert (held.catalog.roots(), held.catalog.files(), shown_paths(held)) == before
    assert before[2] == {"coins.jpg", "coins_crop.jpg"}


def test_each_root_keeps_its_relative_paths(ctx: Context, tmp_path: Path, embedder) -> None:
    run_index(ctx, folder_with_copies(tmp_path / "first", "coins"), show_progress=False)
    run_index(ctx, folder_with_copies(tmp_path / "second" / "deeper", "cat"), show_progress=False)
    assert shown_paths(ctx) == {"coins.jpg", "coins_crop.jpg", "cat.jpg", "cat_crop.jpg"}
    queried = invoke(tmp_path / "data", "query", str(tmp_path / "first" / "coins.jpg"), "--json", embedder=embedder)
    assert queried.exit_code == 0, queried.output
    (entry,) = json.loads(queried.stdout)
    assert {p for m in entry["matches"] for p in m["paths"]} == {"coins.jpg", "coins_crop.jpg"}
    links = tmp_path / "links"
    assert invoke(tmp_path / "data", "export", "--link-dir", str(links)).exit_code == 0
    targets = {link.name: link.resolve() for folder in links.iterdir() for link in folder.iterdir()}
    assert targets == {"coins.jpg": tmp_path / "first" / "coins.jpg",
                       "coins_crop.jpg": tmp_path / "first" / "coins_crop.jpg",
                       "cat.jpg": tmp_path / "second" / "deeper" / "cat.jpg",
                       "cat_crop.jpg": tmp_path / "second" / "deeper" / "cat_crop.jpg"}


# ----------------------------------------------------------------------------- changed, missing, removed


def test_a_file_replaced_in_place_is_read_again(ctx: Context, tmp_path: Path) -> None:
    folder = folder_with_copies(tmp_path / "pics", "coins", "cat")
    run_index(ctx, folder, show_progress=False)
    old = image_of(ctx, "cat_crop.jpg")
    save(crop(load_photo("coins"), 0.8), folder / "cat_crop.jpg", quality=75)  # now a copy of the coins
    summary = run_index(ctx, folder, show_progress=False)
    assert summary["changed_files"] == 1 and summary["new_images"] == 1 and summary["replaced_images"] == 1
    assert not any(stored_everywhere(ctx, old).values())  # no file shows the old image: gone from every store
    rows = {r.path: r.cluster_id for r in cluster_table(ctx)}
    assert rows["cat_crop.jpg"] == rows["coins.jpg"] != rows["cat.jpg"]  # it joined the coins' cluster
    assert summary["clusters"] == 1  # the cat is alone now

    st = (folder / "cat.jpg").stat()
    os.utime(folder / "cat.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, same bytes
    again = run_index(ctx, folder, show_progress=False)
    assert again["inputs"] == 0 and again["changed_files"] == 0 and again["replaced_images"] == 0
    assert ctx.catalog.files()[(folder / "cat.jpg").as_posix()].mtime_ns == st.st_mtime_ns + 5_000_000_000


def test_missing_files_are_reported_then_pruned(tmp_path: Path, embedder) -> None:
    data, folder = tmp_path / "data", folder_with_copies(tmp_path / "pics", "coins", "cat")
    assert invoke(data, "index", str(folder), embedder=embedder).exit_code == 0
    (folder / "cat_crop.jpg").unlink()
    (folder / "coins_crop.jpg").unlink()
    result = invoke(data, "index", str(folder), embedder=embedder)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["missing_files"] == 2
    assert "2 files are missing: run memetrace prune" in result.stderr
    c = Context(make_settings(data), embedder=embedder)
    gone = image_of(c, "cat_crop.jpg")
    assert c.graph_state.counts()["clusters"] == 2  # reported only: nothing removed yet
    summary = prune(c)
    assert summary["removed_paths"] == 2 and summary["removed_images"] == 2 and summary["clusters"] == 0
    assert not any(stored_everywhere(c, gone).values())
    assert shown_paths(c) == {"coins.jpg", "cat.jpg"}
    assert prune(c)["removed_paths"] == 0


def test_remove_takes_images_out_of_every_store_and_their_clusters(ctx: Context, tmp_path: Path) -> None:
    folder = folder_with_copies(tmp_path / "pics", "coins", "cat")
    run_index(ctx, folder, show_progress=False)
    crop_id, coins_id = image_of(ctx, "coins_crop.jpg"), image_of(ctx, "coins.jpg")
    assert all(stored_everywhere(ctx, crop_id).values())
    summary = remove_paths(ctx, [folder / "coins_crop.jpg", tmp_path / "never-indexed.jpg"])
    assert summary["removed_paths"] == 1 and summary["removed_images"] == 1
    assert summary["not_indexed"] == [str(tmp_path / "never-indexed.jpg")]
    assert not any(stored_everywhere(ctx, crop_id).values())
    assert summary["clusters"] == 1  # the coins' cluster dissolved, the cats' stays
    assert ctx.graph_state.clusters_of([coins_id]) != ctx.graph_state.clusters_of([image_of(ctx, "cat.jpg")])
    assert (folder / "coins_crop.jpg").exists()  # the files are not touched
    assert remove_paths(ctx, [folder])["removed_images"] == 3  # a folder: everything indexed below it
    assert ctx.catalog.counts() == {"images": 0, "paths": 0, "bad_files": 0} and ctx.index.count() == 0


def test_remove_verb(tmp_path: Path, embedder) -> None:
    data, folder = tmp_path / "data", folder_with_copies(tmp_path / "pics", "coins")
    assert invoke(data, "index", str(folder), embedder=embedder).exit_code == 0
    result = invoke(data, "remove", str(folder / "coins.jpg"), str(tmp_path / "nope.jpg"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed_images"] == 1
    assert f"{tmp_path / 'nope.jpg'}: not indexed" in result.stderr


def test_reset_asks_then_deletes_a_data_dir_only(tmp_path: Path, embedder) -> None:
    data, folder = tmp_path / "data", folder_with_copies(tmp_path / "pics", "coins")
    assert invoke(data, "index", str(folder), embedder=embedder).exit_code == 0
    refused = invoke(data, "reset", input="n\n")
    assert refused.exit_code == 1 and "Delete everything in" in refused.output and (data / "catalog.db").exists()
    done = invoke(data, "reset", "--yes")
    assert done.exit_code == 0, done.output
    assert list(data.iterdir()) == [] and folder.is_dir() and len(list(folder.iterdir())) == 2
    again = invoke(data, "index", str(folder), embedder=embedder)  # a fresh start
    assert json.loads(again.stdout)["new_images"] == 2
    home = tmp_path / "home"
    (home / "notes.txt").parent.mkdir()
    (home / "notes.txt").write_text("mine")
    (home / "catalog.db").write_text("")
    result = invoke(home, "reset", "--yes")
    assert result.exit_code == 1 and "does not look like a memetrace data dir" in result.output
    assert "notes.txt" in result.output and (home / "notes.txt").exists()
    with pytest.raises(ValueError, match="not look like a memetrace data dir .it also holds coins.jpg, coins_crop"):
        reset(Context(make_settings(folder)))


# ----------------------------------------------------------------------------- bad files


def test_bad_files_are_listed_with_their_reasons(tmp_path: Path, embedder) -> None:
    data, folder = tmp_path / "data", folder_with_copies(tmp_path / "pics", "coins")
    (folder / "empty.jpg").write_bytes(b"")
    for i in range(6):
        (folder / "text" / f"note{i}.png").parent.mkdir(exist_ok=True)
        (folder / "text" / f"note{i}.png").write_text("not a png")
    result = invoke(data, "index", str(folder), embedder=embedder)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "7 bad files, not indexed:" in lines and "  empty.jpg: empty (zero bytes)" in lines
    assert sum(line.startswith("  text/note") for line in lines) == 4 and "memetrace bad-files lists all" in lines
    listed = invoke(data, "bad-files", "--csv")
    assert listed.exit_code == 0, listed.output
    rows = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert [(r["path"], r["reason"]) for r in rows] == [("empty.jpg", "empty")] + \
        [(f"text/note{i}.png", "not_an_image") for i in range(6)]
    plain = invoke(data, "bad-files").stdout.splitlines()
    assert plain[0].startswith("empty.jpg\tempty") and len(plain) == 7


# ----------------------------------------------------------------------------- per-run flags


def test_walk_excludes_globs_and_follows_links_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for rel in ("a.jpg", "raw/b.jpg", "keep/c.jpg", "keep/d.tmp", ".hidden/e.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f.jpg").write_bytes(b"x")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "keep" / "loop").symlink_to(root)  # a loop: entered once at most

    def listed(walk: Walk) -> list[str]:
        return [Path(it.key).relative_to(root.resolve()).as_posix() for it in iter_directory(root, 100, walk)]

    assert listed(Walk()) == ["a.jpg", "keep/c.jpg", "keep/d.tmp", "raw/b.jpg"]
    assert listed(Walk(exclude=("raw", "*.tmp"))) == ["a.jpg", "keep/c.jpg"]
    assert listed(Walk(exclude=("keep/*",))) == ["a.jpg", "raw/b.jpg"]
    assert listed(Walk(follow_links=True)) == ["a.jpg", "keep/c.jpg", "keep/d.tmp", "linked/f.jpg", "raw/b.jpg"]


def test_index_flags(tmp_path: Path, embedder) -> None:
    data, folder = tmp_path / "data", folder_with_copies(tmp_path / "pics", "coins", "cat")
    first = invoke(data, "index", str(folder), "--exclude", "cat*", "--limit", "1", "--workers", "1",
                   embedder=embedder)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["paths"] == 1  # coins.jpg only: the cats excluded, then one file
    rest = json.loads(invoke(data, "index", str(folder), embedder=embedder).stdout)
    assert rest["inputs"] == 3 and rest["paths"] == 4 and rest["clusters"] == 2
    assert IndexOptions(workers=3).settings(make_settings(tmp_path)).match_threads == 3


def test_query_searches_images_stored_without_the_catalog(tmp_path: Path, embedder) -> None:
    """The streaming ingest stores through the Indexer and writes no catalog row: `query` must still
    search what Milvus holds (it used to say "nothing indexed")."""
    from memetrace.ingest.indexer import IndexConfig, Indexer
    from memetrace.ingest.sources import InputItem

    data, photo = tmp_path / "data", folder_with_copies(tmp_path / "pics", "coins") / "coins.jpg"
    c = Context(make_settings(data), embedder=embedder)
    indexer = Indexer(IndexConfig.from_settings(c.settings), embedder, c.extractor, c.index, c.features)
    (stored,) = [o for chunk in indexer.index([InputItem("post-1", photo.read_bytes)]) for o in chunk]
    assert not c.catalog.images()
    c.close()
    result = invoke(data, "query", str(photo), "--json", embedder=embedder)
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)
    assert [m["image_id"] for m in entry["matches"]] == [stored.image_id]
