"""Bytes on disk per image, per store (``memetrace stats``'s ``bytes_per_image``).

What each local store takes on disk (files as allocated: ``st_blocks``, SQLite write-ahead logs
included), divided by the images stored. A store kept elsewhere (a Milvus server, S3) is not on
this disk and is left out: ``stats`` says so by its absence. Light to import: no store is opened.
"""

from __future__ import annotations

from pathlib import Path

from memetrace.settings import Settings


def disk_bytes(path: Path) -> int:
    """Allocated bytes of a file, or of every file under a folder (0 if absent)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def store_paths(s: Settings) -> dict[str, list[Path]]:
    """Each local store's files (a SQLite file with its -wal and -shm)."""
    def sqlite(p: Path) -> list[Path]:
        return [p, p.with_name(p.name + "-wal"), p.with_name(p.name + "-shm")]

    state = s.resolved_cluster_state_path()
    features = s.data_dir / "features"
    out = {"keypoints": sqlite(features / "keypoints.db"), "thumbnails": sqlite(features / "thumbnails.db"),
           "cluster_state": sqlite(state), "trees": sqlite(state.with_name("trees.db")),
           "batch_catalog": sqlite(s.data_dir / "catalog.db")}
    uri = s.resolved_milvus_uri()
    if "://" not in uri:  # Milvus Lite: a local folder
        out["milvus"] = [Path(uri)]
    return out


def bytes_per_image(s: Settings, images: int) -> dict[str, float]:
    """store -> bytes per image (rounded), and ``total``; empty when nothing is stored."""
    if images <= 0:
        return {}
    sizes = {name: sum(map(disk_bytes, paths)) for name, paths in store_paths(s).items()}
    out = {name: round(n / images, 1) for name, n in sizes.items() if n}
    return {**out, "total": round(sum(sizes.values()) / images, 1)}
