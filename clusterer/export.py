"""Write clusters for people: PIMMI-style CSV, JSON, Parquet and a folder of symlinks per cluster.

The three file formats hold the same rows (:data:`CSV_COLUMNS`, one per file path, biggest
cluster first): CSV as PIMMI writes it, Parquet as one flat typed table, JSON grouped by cluster
(``{"clusters": [{"cluster_id", "quality", "images", "members": [{"path", "image_id",
"nb_points", "degree"}]}]}``). Parquet needs pyarrow, an optional extra (``memetrace[parquet]``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from memetrace.clusterer.graph import density

CSV_COLUMNS = ["path", "image_id", "nb_points", "degree", "cluster_id", "quality"]


@dataclass(frozen=True)
class ClusterRow:
    path: str
    image_id: int
    nb_points: int
    degree: int
    cluster_id: int
    quality: float


def cluster_rows(g: nx.Graph, assignment: dict[int, int], paths: dict[int, list[str]],
                 nb_points: dict[int, int]) -> list[ClusterRow]:
    """One row per file path, clusters in order of size (biggest first)."""
    members: dict[int, set[int]] = {}
    for image, cid in assignment.items():
        members.setdefault(cid, set()).add(image)
    quality = {cid: round(density(g, group), 4) for cid, group in members.items()}
    order = sorted(members, key=lambda c: (-len(members[c]), c))
    rows = []
    for cid in order:
        for image in sorted(members[cid]):
            for path in paths.get(image, []):
                rows.append(ClusterRow(path, image, nb_points.get(image, 0),
                                       g.degree(image) if image in g else 0, cid, quality[cid]))
    return rows


def write_csv(rows: list[ClusterRow], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r.path, r.image_id, r.nb_points, r.degree, r.cluster_id, r.quality])


FORMATS = ("csv", "json", "parquet")
#: what a member of a cluster carries in JSON: the CSV columns less those of its cluster
MEMBER_COLUMNS = ["path", "image_id", "nb_points", "degree"]


class MissingExtra(ImportError):
    """An optional dependency of one format is not installed; the message says what to install."""


def format_of(out: Path, default: str = "csv") -> str:
    """The format an output path names by its suffix (``.json``, ``.parquet``...), else ``default``."""
    suffix = out.suffix.lower().lstrip(".")
    return {"pq": "parquet"}.get(suffix, suffix) if suffix in (*FORMATS, "pq") else default


def write_clusters(rows: list[ClusterRow], out: Path, fmt: str) -> None:
    """``rows`` into ``out`` as ``fmt`` (one of :data:`FORMATS`)."""
    writers = {"csv": write_csv, "json": write_json, "parquet": write_parquet}
    if fmt not in writers:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    writers[fmt](rows, out)


def grouped(rows: list[ClusterRow]) -> list[dict[str, Any]]:
    """The rows as clusters with their members, in the rows' order (biggest cluster first)."""
    clusters: dict[int, dict[str, Any]] = {}
    for r in rows:
        cluster = clusters.setdefault(r.cluster_id, {"cluster_id": r.cluster_id, "quality": r.quality,
                                                     "images": 0, "members": []})
        cluster["members"].append({k: getattr(r, k) for k in MEMBER_COLUMNS})
    for cluster in clusters.values():
        cluster["images"] = len({m["image_id"] for m in cluster["members"]})
    return list(clusters.values())


def write_json(rows: list[ClusterRow], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"clusters": grouped(rows)}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_parquet(rows: list[ClusterRow], out: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingExtra("writing Parquet needs pyarrow: pip install 'memetrace[parquet]'") from exc
    # an explicit schema: an empty export keeps its typed columns
    types = {"path": pa.string(), "quality": pa.float64()}
    schema = pa.schema([(c, types.get(c, pa.int64())) for c in CSV_COLUMNS])
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([asdict(r) for r in rows], schema=schema), out)


def write_link_dir(rows: list[ClusterRow], root: Path, out: Path, min_size: int = 2,
                   targets: Sequence[str] | None = None) -> int:
    """``out/cluster_<id>/`` holds a symlink to each file of clusters of ``min_size``+ images,
    named by its row's path; ``targets``: each row's file (same order; default: its path below
    ``root``). Returns the number of folders made."""
    images: dict[int, set[int]] = {}
    for r in rows:
        images.setdefault(r.cluster_id, set()).add(r.image_id)
    made = set()
    for n, r in enumerate(rows):
        if len(images[r.cluster_id]) < min_size:
            continue
        folder = out / f"cluster_{r.cluster_id}"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / r.path.replace("/", "__")
        if link.is_symlink() or link.exists():
            link.unlink()
        path = r.path if targets is None else targets[n]
        target = Path(path) if os.path.isabs(path) else (root / path).resolve()
        link.symlink_to(target)
        made.add(r.cluster_id)
    return len(made)
