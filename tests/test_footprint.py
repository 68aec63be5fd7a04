"""memetrace.cli.footprint (``memetrace stats``' ``bytes_per_image``): every local store's files
counted as allocated, SQLite write-ahead logs and Milvus Lite's nested files (parquet copy, index
sidecars) included, a Milvus server left out."""

from __future__ import annotations

from pathlib import Path

from memetrace.cli.footprint import bytes_per_image, disk_bytes, store_paths
from memetrace.settings import Settings


def write(path: Path, n: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * n)
    return disk_bytes(path)


def test_each_store_is_counted_per_image_wal_and_nested_files_included(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, milvus_uri="", cluster_state_path=None)
    sizes = {"keypoints": write(tmp_path / "features/keypoints.db", 9000)
             + write(tmp_path / "features/keypoints.db-wal", 3000),
             "thumbnails": write(tmp_path / "features/thumbnails.db", 5000),
             "cluster_state": write(s.resolved_cluster_state_path(), 2000),
             "batch_catalog": write(tmp_path / "catalog.db-shm", 100)}
    lite = Path(s.resolved_milvus_uri()) / "collections/memetrace_regions/partitions/_default"
    sizes["milvus"] = write(lite / "data/data_000001.parquet", 7000) + write(lite / "indexes/x.vector.flat.idx", 6000)
    assert all(sizes.values()) and disk_bytes(tmp_path / "features/keypoints.db") >= 9000  # allocated, not less

    got = bytes_per_image(s, 4)

    assert got == {**{k: round(v / 4, 1) for k, v in sizes.items()}, "total": round(sum(sizes.values()) / 4, 1)}
    assert "trees" not in got  # a store with no file yet is not listed


def test_a_milvus_server_is_not_on_this_disk_and_nothing_stored_gives_nothing(tmp_path: Path) -> None:
    server = Settings(data_dir=tmp_path, milvus_uri="http://milvus:19530", cluster_state_path=None)
    assert "milvus" not in store_paths(server)
    write(tmp_path / "features/keypoints.db", 100)
    assert bytes_per_image(server, 0) == {}
    assert set(bytes_per_image(server, 1)) == {"keypoints", "total"}
