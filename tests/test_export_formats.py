"""``memetrace export --format csv|json|parquet``: the JSON and Parquet files hold the CSV's rows.

The data dir is filled by hand (batch catalog + clusterer state, reclustered): export reads no
Milvus and no model, so these tests need neither.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from memetrace.cli.catalog import SqliteBatchCatalog
from memetrace.cli.main import main
from memetrace.clusterer.export import CSV_COLUMNS, format_of
from memetrace.clusterer.service import recluster
from memetrace.clusterer.state import SqliteGraphState
from memetrace.models import Match

# image id -> its files (relative to the root); names a CSV must quote, and one not ASCII
FILES = {11: ["a/cat.jpg", "a/cat copy, 2.jpg"], 12: ['b/"cat" meme.png'], 13: ["b/chat-é.webp"],
         21: ["c/dog.jpg"], 22: ["c/dog_crop.jpg"], 31: ["lonely.jpg"]}
MATCHES = [Match(11, 12, 80, "full"), Match(12, 13, 35, "partial"), Match(21, 22, 50, "full")]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("export") / "data"
    root = "/photos"
    catalog, state = SqliteBatchCatalog(data / "catalog.db"), SqliteGraphState(data / "cluster-state.db")
    try:
        root_id = catalog.add_root(root)
        catalog.add_images((i, 100 + i) for i in FILES)
        catalog.add_paths((f"{root}/{p}", i, root_id) for i, paths in FILES.items() for p in paths)
        state.add_images((i, 100 + i) for i in FILES)
        state.add_matches(MATCHES)
        recluster(state, "components")
    finally:
        catalog.close()
        state.close()
    return data


def export(data: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--data-dir", str(data), "export", *args], catch_exceptions=False)


def typed(row: dict[str, str]) -> dict[str, object]:
    """A CSV row with the types JSON and Parquet keep."""
    return {k: v if k == "path" else float(v) if k == "quality" else int(v) for k, v in row.items()}


@pytest.fixture(scope="module")
def csv_rows(data: Path) -> list[dict[str, object]]:
    result = export(data, "--format", "csv")
    assert result.exit_code == 0, result.output
    with (data / "clusters.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == CSV_COLUMNS
        rows = [typed(r) for r in reader]
    assert sorted(r["path"] for r in rows) == sorted(p for paths in FILES.values() for p in paths)  # shown relative
    return rows


def test_json_holds_the_csv_rows_grouped_by_cluster(data: Path, csv_rows: list[dict[str, object]]) -> None:
    result = export(data, "--format", "json")
    assert result.exit_code == 0, result.output
    out = data / "clusters.json"
    assert f"clusters JSON: {out} ({len(csv_rows)} rows)" in result.stdout
    clusters = json.loads(out.read_text(encoding="utf-8"))["clusters"]
    flat = [{**m, "cluster_id": c["cluster_id"], "quality": c["quality"]} for c in clusters for m in c["members"]]
    assert [{k: r[k] for k in CSV_COLUMNS} for r in flat] == csv_rows
    assert [c["images"] for c in clusters] == [3, 2, 1]  # biggest first, images (not files) counted
    assert len({c["cluster_id"] for c in clusters}) == 3


def test_parquet_holds_the_csv_rows_typed(data: Path, csv_rows: list[dict[str, object]], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out" / "clusters.parquet"
    result = export(data, "--out", str(out))  # the format named by the suffix
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == CSV_COLUMNS
    assert table.schema.field("image_id").type == pa.int64() and table.schema.field("quality").type == pa.float64()
    assert table.to_pylist() == csv_rows


def test_an_empty_export_keeps_its_columns(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    for fmt in ("json", "parquet"):
        assert export(tmp_path / "empty", "--format", fmt).exit_code == 0
    assert json.loads((tmp_path / "empty" / "clusters.json").read_text()) == {"clusters": []}
    table = pq.read_table(tmp_path / "empty" / "clusters.parquet")
    assert table.column_names == CSV_COLUMNS and table.num_rows == 0


def test_parquet_without_pyarrow_says_what_to_install(data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    result = CliRunner().invoke(main, ["--data-dir", str(data), "export", "--out", str(tmp_path / "c.parquet")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: writing Parquet needs pyarrow: pip install 'memetrace[parquet]'"]
    assert not (tmp_path / "c.parquet").exists()


def test_format_of_a_path() -> None:
    assert [format_of(Path(p)) for p in ("a.json", "a.PARQUET", "a.pq", "a.csv", "a.txt", "a")] == [
        "json", "parquet", "parquet", "csv", "csv", "csv"]
