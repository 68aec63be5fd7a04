"""Derivation trees as files (``memetrace tree``): CSV (``path,parent_path,cluster_id,edit,
confidence,first_seen``, one row per image, an empty parent for a root), JSON, or GraphML for
graph tools (nodes = images, edges parent -> child with the edit and confidence)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import networkx as nx

from memetrace.clusterer.tree import Derivation

FORMATS = ("csv", "json", "graphml")
COLUMNS = ["path", "parent_path", "cluster_id", "edit", "confidence", "first_seen"]


@dataclass(frozen=True)
class TreeRow:
    path: str
    parent_path: str  # "" for a root
    cluster_id: int
    edit: str
    confidence: float
    first_seen: str  # ISO 8601 UTC of the earliest observed post, "" when none

    def as_list(self) -> list:
        return [self.path, self.parent_path, self.cluster_id, self.edit, self.confidence, self.first_seen]


def iso(t: int | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tree_rows(trees: Mapping[int, Sequence[Derivation]], path_of: Mapping[int, str],
              first_seen: Mapping[int, int]) -> list[TreeRow]:
    """One row per image, by cluster then origin first, then by first post."""
    out = []
    for cid in sorted(trees):
        order = sorted(trees[cid], key=lambda d: (d.parent is not None, first_seen.get(d.image_id, 2**62), d.image_id))
        for d in order:
            out.append(TreeRow(path_of.get(d.image_id, str(d.image_id)),
                               "" if d.parent is None else path_of.get(d.parent, str(d.parent)),
                               cid, d.edit, d.confidence, iso(first_seen.get(d.image_id))))
    return out


def write_tree(rows: Sequence[TreeRow], out: Path, fmt: str = "csv") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with out.open("w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(COLUMNS)
            w.writerows(r.as_list() for r in rows)
    elif fmt == "json":
        out.write_text(json.dumps([dict(zip(COLUMNS, r.as_list())) for r in rows], indent=1))
    elif fmt == "graphml":
        g = nx.DiGraph()
        for r in rows:
            g.add_node(r.path, cluster_id=r.cluster_id, first_seen=r.first_seen)
        for r in rows:
            if r.parent_path:
                g.add_edge(r.parent_path, r.path, edit=r.edit, confidence=r.confidence)
        nx.write_graphml(g, out)
    else:
        raise ValueError(f"tree format {fmt!r}: use one of {', '.join(FORMATS)}")
    return out
