"""Derivation trees as files (``memetrace tree``): CSV (``path,parent_path,cluster_id,edit,
confidence,first_seen``, one row per image, an empty parent for a root, then the image's earliest
observed post: ``first_post_id,platform,author,meta``, its meta as JSON text), JSON, or GraphML
for graph tools (nodes = images, edges parent -> child with the edit and confidence)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import networkx as nx

from memetrace.clusterer.tree import Derivation
from memetrace.models import OccurrenceRow
from memetrace.varchar import json_text

FORMATS = ("csv", "json", "graphml")
COLUMNS = ["path", "parent_path", "cluster_id", "edit", "confidence", "first_seen"]  # the order issue 14 asks
POST_COLUMNS = ["first_post_id", "platform", "author", "meta"]  # after them: a scorer reading by position still reads


@dataclass(frozen=True)
class TreeRow:
    path: str
    parent_path: str  # "" for a root
    cluster_id: int
    edit: str
    confidence: float
    first_seen: str  # ISO 8601 UTC of the earliest observed post, "" when none
    # that post (the occurrence log's earliest of known time); "" and {} when none
    first_post_id: str = ""
    platform: str = ""
    author: str = ""
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)

    def as_list(self) -> list:
        """The CSV row: the meta as JSON text, "" when it has none."""
        return [self.path, self.parent_path, self.cluster_id, self.edit, self.confidence, self.first_seen,
                self.first_post_id, self.platform, self.author, json_text(self.meta) if self.meta else ""]

    def as_dict(self) -> dict:
        return dict(zip(COLUMNS + POST_COLUMNS, self.as_list())) | {"meta": dict(self.meta)}


def iso(t: int | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tree_rows(trees: Mapping[int, Sequence[Derivation]], path_of: Mapping[int, str],
              first_seen: Mapping[int, int], first_post: Mapping[int, OccurrenceRow] | None = None) -> list[TreeRow]:
    """One row per image, by cluster then origin first, then by first post (``first_post``: each
    image's earliest post, :func:`memetrace.tree_store.earliest_posts`)."""
    first_post = first_post or {}
    out = []
    for cid in sorted(trees):
        order = sorted(trees[cid], key=lambda d: (d.parent is not None, first_seen.get(d.image_id, 2**62), d.image_id))
        for d in order:
            post = first_post.get(d.image_id)
            out.append(TreeRow(path_of.get(d.image_id, str(d.image_id)),
                               "" if d.parent is None else path_of.get(d.parent, str(d.parent)),
                               cid, d.edit, d.confidence, iso(first_seen.get(d.image_id)),
                               *(() if post is None else (post.post_id, post.platform, post.author, post.meta))))
    return out


def write_tree(rows: Sequence[TreeRow], out: Path, fmt: str = "csv") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with out.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(COLUMNS + POST_COLUMNS)
            w.writerows(r.as_list() for r in rows)
    elif fmt == "json":
        out.write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    elif fmt == "graphml":
        g = nx.DiGraph()
        for r in rows:  # GraphML attributes are scalars: the meta as its JSON text
            g.add_node(r.path, cluster_id=r.cluster_id, first_seen=r.first_seen, first_post_id=r.first_post_id,
                       platform=r.platform, author=r.author, meta=json_text(r.meta))
        for r in rows:
            if r.parent_path:
                g.add_edge(r.parent_path, r.path, edit=r.edit, confidence=r.confidence)
        nx.write_graphml(g, out)
    else:
        raise ValueError(f"tree format {fmt!r}: use one of {', '.join(FORMATS)}")
    return out
