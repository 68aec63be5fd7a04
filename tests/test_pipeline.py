"""End to end through the ``memetrace`` CLI on the demo corpus: index, clusters, query, stats, eval.

The corpus is indexed once per module (with the session's embedder); the tests that add files to
it come last, after those that check the first run's numbers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from memetrace.clusterer.evaluate import evaluate
from memetrace.cli.catalog import SqliteBatchCatalog
from memetrace.clusterer.state import SqliteGraphState
from memetrace.cli.main import main
from memetrace.cli.demo import BAD_FILES, COPIES_PER_PHOTO, GROUP_PHOTOS, make_demo_corpus


@dataclass
class Run:
    corpus: Path  # out_dir of make_demo_corpus (ground_truth.csv)
    images: Path  # the indexed folder
    data: Path  # --data-dir
    out: Path  # where clusters writes its files
    summary: dict
    truth: list[dict[str, str]]
    embedder: object  # the session's, handed to every in-process CLI run

    def invoke(self, *args: str, data: Path | None = None) -> Result:
        return invoke("--data-dir", str(data or self.data), *args, embedder=self.embedder)

    def catalog(self) -> SqliteBatchCatalog:
        return SqliteBatchCatalog(self.data / "catalog.db")

    def files(self) -> dict[str, tuple[int, int]]:
        """Indexed path -> (image id, cluster id): the batch catalog's paths, the clusterer state's clusters."""
        cat, state = self.catalog(), SqliteGraphState(self.data / "cluster-state.db")
        try:
            clusters = state.clusters()
            return {p: (i, clusters[i]) for i, paths in cat.paths_by_image().items() for p in paths}
        finally:
            cat.close()
            state.close()

    def good(self) -> list[dict[str, str]]:
        return [r for r in self.truth if r["role"] != "bad"]


def invoke(*args: str, embedder=None) -> Result:
    """Run the CLI in-process (with the session's ``embedder``: the model loads once); the root
    logger the CLI reconfigures is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(main, list(args), catch_exceptions=False, obj=embedder)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _json(result: Result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, embedder):
    base = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.upper().startswith("MEMETRACE_"):
                mp.delenv(key)
        mp.chdir(base)  # no stray .env file
        corpus = base / "corpus"
        images = make_demo_corpus(corpus)
        with (corpus / "ground_truth.csv").open(newline="", encoding="utf-8") as fh:
            truth = list(csv.DictReader(fh))
        data = base / "data"
        summary = _json(invoke("--data-dir", str(data), "index", str(images), embedder=embedder))
        yield Run(corpus, images, data, base / "out", summary, truth, embedder)


@pytest.fixture(scope="module")
def exported(run: Run) -> Result:
    result = run.invoke("export", "--out", str(run.out / "clusters.csv"), "--html", str(run.out / "html"),
                        "--link-dir", str(run.out / "links"))
    assert result.exit_code == 0, result.output
    return result


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


# ----------------------------------------------------------------------------- index


def test_index_summary(run: Run) -> None:
    s = run.summary
    n_good = len(GROUP_PHOTOS) * (1 + COPIES_PER_PHOTO) + 2  # + 2 distractors
    assert len(run.good()) == n_good
    assert s["inputs"] == n_good + len(BAD_FILES)
    assert s["new_images"] == n_good and s["duplicates"] == 0
    assert s["bad_inputs"] == {"empty": 1, "not_an_image": 1}
    assert s["images"] == n_good and s["paths"] == n_good and s["bad_files"] == 2
    assert s["new_matches"] == s["matches"] >= len(GROUP_PHOTOS) * COPIES_PER_PHOTO
    assert s["clusters"] == len(GROUP_PHOTOS)
    for key in ("index_s", "match_s", "cluster_s"):
        assert s[key] >= 0


def test_every_good_file_is_indexed(run: Run) -> None:
    cat = run.catalog()
    try:
        # the catalog keys files by absolute path (two folders in one data dir never collide)
        root = run.images.resolve()
        indexed = {p for paths in cat.paths_by_image().values() for p in paths}
        assert indexed == {str(root / r["path"].removeprefix("images/")) for r in run.good()}
        bad = {p: reason for p, reason, _ in cat.bad_files()}
        assert bad == {str(root / name): reason for name, (_, reason) in BAD_FILES.items()}
        assert cat.unmatched() == []  # every new image went through matching
        assert list(cat.roots().values()) == [str(run.images.resolve())]
    finally:
        cat.close()


# ----------------------------------------------------------------------------- clusters and eval


def test_clusters_files(run: Run, exported: Result) -> None:
    csv_path, html, links = run.out / "clusters.csv", run.out / "html", run.out / "links"
    assert f"clusters CSV: {csv_path} ({len(run.good())} rows)" in exported.stdout
    columns, rows = _csv_rows(csv_path)
    assert columns == ["path", "image_id", "nb_points", "degree", "cluster_id", "quality"]
    assert sorted(r["path"] for r in rows) == sorted(r["path"].removeprefix("images/") for r in run.good())
    assert (html / "index.html").is_file() and "gallery:" in exported.stdout
    folders = sorted(links.iterdir())
    assert len(folders) == run.summary["clusters"] and f"link folders: {len(folders)}" in exported.stdout
    sizes = {}
    for r in rows:
        sizes[r["cluster_id"]] = sizes.get(r["cluster_id"], 0) + 1
    assert {f.name for f in folders} == {f"cluster_{c}" for c, n in sizes.items() if n >= 2}
    for folder in folders:
        for link in folder.iterdir():
            assert link.is_symlink()
            target = link.resolve()
            assert target.is_file() and target.parent == run.images.resolve()
            assert link.name == target.name


def test_the_old_clusters_verb_still_exports_with_a_warning(run: Run, exported: Result,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="memetrace"):
        result = run.invoke("clusters", "--out", str(run.out / "old-verb.csv"))
    assert result.exit_code == 0, result.output
    assert (run.out / "old-verb.csv").read_text() == (run.out / "clusters.csv").read_text()
    assert any("is now `memetrace export`" in r.getMessage() for r in caplog.records)


def test_cluster_f1_against_the_demo_ground_truth(run: Run, exported: Result) -> None:
    scores = evaluate(run.corpus / "ground_truth.csv", run.out / "clusters.csv")
    assert scores["cluster_f1"] >= 0.9, scores
    assert scores["unknown_paths_in_prediction"] == 0  # bare names resolve against the ground truth
    # the distractors stay alone
    _, rows = _csv_rows(run.out / "clusters.csv")
    cluster_of = {r["path"]: r["cluster_id"] for r in rows}
    members = {}
    for r in rows:
        members.setdefault(r["cluster_id"], []).append(r["path"])
    for t in run.truth:
        if t["role"] == "distractor":
            assert members[cluster_of[t["path"].removeprefix("images/")]] == [t["path"].removeprefix("images/")]


def test_eval_command(run: Run, exported: Result) -> None:
    result = invoke("eval", str(run.corpus / "ground_truth.csv"), str(run.out / "clusters.csv"))
    scores = _json(result)
    assert scores["cluster_f1"] == pytest.approx(
        evaluate(run.corpus / "ground_truth.csv", run.out / "clusters.csv")["cluster_f1"])
    assert scores["cluster_f1"] >= 0.9


def test_eval_command_rejects_a_bad_csv(run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,cluster\nx.jpg,1\n", encoding="utf-8")
    result = invoke("eval", str(run.corpus / "ground_truth.csv"), str(bad))
    assert result.exit_code != 0 and "cluster_id" in result.output


# ----------------------------------------------------------------------------- stats and query


def test_stats_json(run: Run) -> None:
    stats = _json(run.invoke("stats", "--json"))
    n_good = len(run.good())
    assert stats["images"] == n_good and stats["paths"] == n_good
    assert stats["bad_files"] == 2 and stats["bad_files_by_reason"] == {"empty": 1, "not_an_image": 1}
    assert stats["matches"] == run.summary["matches"]
    assert stats["clusters"] == len(GROUP_PHOTOS)
    assert stats["data_dir"] == str(run.data)
    text = run.invoke("stats")
    assert text.exit_code == 0
    lines = dict(line.split(None, 1) for line in text.stdout.splitlines())
    assert lines["images"] == str(n_good)
    assert json.loads(lines["bad_files_by_reason"]) == {"empty": 1, "not_an_image": 1}


def _cluster_of(run: Run, image_path: str) -> tuple[int, int]:
    """(image id, cluster id) of an indexed file."""
    return run.files()[str(run.images.resolve() / image_path)]


def test_query_a_new_copy_finds_the_original(run: Run, tmp_path: Path) -> None:
    with Image.open(run.images / "cat.jpg") as im:
        w, h = im.size
        part = im.convert("RGB").crop((w // 10, h // 10, w * 9 // 10, h * 8 // 10))  # 56% of the area
        copy = part.resize((round(part.width * 0.6), round(part.height * 0.6)), Image.Resampling.BILINEAR)
    query = tmp_path / "cat_repost.jpg"
    copy.save(query, quality=60)
    (entry,) = _json(run.invoke("query", str(query), "--json"))
    assert entry["query"] == str(query) and "error" not in entry
    cat_id, cat_cluster = _cluster_of(run, "cat.jpg")
    by_id = {m["image_id"]: m for m in entry["matches"]}
    assert cat_id in by_id
    found = by_id[cat_id]
    assert found["paths"] == ["cat.jpg"] and found["cluster_id"] == cat_cluster
    assert found["inliers"] >= 10 and found["kind"] in ("full", "partial") and found["mirrored"] is False
    # what it finds are cat pictures only
    assert {m["cluster_id"] for m in entry["matches"]} == {cat_cluster}


def test_query_an_indexed_file_is_identical(run: Run) -> None:
    (entry,) = _json(run.invoke("query", str(run.images / "coins.jpg"), "--json"))
    coins_id, coins_cluster = _cluster_of(run, "coins.jpg")
    assert entry["image_id"] == coins_id
    top = entry["matches"][0]
    assert top["image_id"] == coins_id and top["kind"] == "identical" and top["cluster_id"] == coins_cluster


def test_query_by_id_finds_what_the_file_finds(run: Run) -> None:
    """A stored image searched by its id (from its stored features) finds the copies its file finds."""
    coins_id, _ = _cluster_of(run, "coins.jpg")
    by_file, by_id = _json(run.invoke("query", str(run.images / "coins.jpg"), str(coins_id), "--json"))
    assert by_id["query"] == str(coins_id) and by_id["image_id"] == coins_id
    copies = {m["image_id"] for m in by_file["matches"] if m["kind"] != "identical"}
    assert copies and {m["image_id"] for m in by_id["matches"]} == copies  # never itself
    unknown, again = _json(run.invoke("query", "12345", "²", str(coins_id), "--json"))[:2]
    assert unknown["error"] == "unknown_image" and unknown["matches"] == [] and again["error"] == "unknown_image"
    text = run.invoke("query", "12345")
    assert text.exit_code == 0 and "12345: neither a readable file nor the id of an image indexed" in text.stdout


def test_query_a_non_image_is_an_error_entry(run: Run) -> None:
    result = run.invoke("query", str(run.images / "notes.png"), str(run.images / "coins.jpg"), "--json")
    bad, good = _json(result)
    assert bad["error"] == "not_an_image" and bad["matches"] == []
    assert good["matches"] and "error" not in good
    text = run.invoke("query", str(run.images / "empty.jpg"))
    assert text.exit_code == 0 and "not an indexable image (empty" in text.stdout


def test_query_before_anything_is_indexed(run: Run, tmp_path: Path) -> None:
    result = run.invoke("query", str(run.images / "cat.jpg"), data=tmp_path / "fresh")
    assert result.exit_code != 0
    assert "nothing indexed" in result.output and "memetrace index" in result.output


# ----------------------------------------------------------------------------- later runs (mutate the corpus)


def test_reindex_is_idempotent(run: Run) -> None:
    before = _cluster_rows_by_path(run)
    again = _json(run.invoke("index", str(run.images)))
    assert again["new_images"] == 0 and again["new_matches"] == 0 and again["duplicates"] == 0
    for key in ("images", "paths", "bad_files", "matches", "clusters"):
        assert again[key] == run.summary[key], key
    assert _cluster_rows_by_path(run) == before  # clusters keep their ids


def test_a_renamed_copy_is_a_duplicate(run: Run) -> None:
    before = _cluster_rows_by_path(run)
    shutil.copy(run.images / "astronaut.jpg", run.images / "zz_astronaut_renamed.jpg")
    summary = _json(run.invoke("index", str(run.images)))
    # bad files are read again on every run (they may have been fixed), good ones are not
    assert summary["inputs"] == 1 + len(BAD_FILES) and summary["duplicates"] == 1 and summary["new_images"] == 0
    assert summary["new_matches"] == 0
    assert summary["images"] == run.summary["images"] and summary["paths"] == run.summary["paths"] + 1
    after = _cluster_rows_by_path(run)
    assert after.pop("zz_astronaut_renamed.jpg") == before["astronaut.jpg"]  # same image, same cluster
    assert after == before
    stats = _json(run.invoke("stats", "--json"))
    assert stats["paths"] == run.summary["paths"] + 1 and stats["images"] == run.summary["images"]


def test_a_new_copy_joins_its_cluster(run: Run) -> None:
    before = _cluster_rows_by_path(run)
    with Image.open(run.images / "coins.jpg") as im:
        im.convert("RGB").rotate(-5, expand=True, fillcolor="white").save(run.images / "zz_coins_tilted.jpg")
    summary = _json(run.invoke("index", str(run.images)))
    assert summary["new_images"] == 1 and summary["new_matches"] >= 1
    assert summary["clusters"] == len(GROUP_PHOTOS)
    after = _cluster_rows_by_path(run)
    assert after.pop("zz_coins_tilted.jpg") == before["coins.jpg"]
    assert after == before  # every other file keeps its cluster id


def _cluster_rows_by_path(run: Run) -> dict[str, int]:
    return {Path(p).name: cluster for p, (_, cluster) in run.files().items()}
