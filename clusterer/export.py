"""Write clusters for people: PIMMI-style CSV and a folder of symlinks per cluster."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

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


def write_link_dir(rows: list[ClusterRow], root: Path, out: Path, min_size: int = 2) -> int:
    """``out/cluster_<id>/`` holds a symlink to each file of clusters of ``min_size``+ images;
    returns the number of folders made."""
    images: dict[int, set[int]] = {}
    for r in rows:
        images.setdefault(r.cluster_id, set()).add(r.image_id)
    made = set()
    for r in rows:
        if len(images[r.cluster_id]) < min_size:
            continue
        folder = out / f"cluster_{r.cluster_id}"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / r.path.replace("/", "__")
        if link.is_symlink() or link.exists():
            link.unlink()
        target = Path(r.path) if os.path.isabs(r.path) else (root / r.path).resolve()
        link.symlink_to(target)
        made.add(r.cluster_id)
    return len(made)
