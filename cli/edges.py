"""``memetrace matches``: the verified edges (image pairs, inliers, kind, geometry when stored) as CSV,
JSON or GraphML for graph tools (Gephi, networkx, igraph)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from xml.sax.saxutils import quoteattr

from memetrace.models import Match

COLUMNS = ("a", "b", "path_a", "path_b", "inliers", "kind", "box_a", "box_b", "scale", "rotation", "mirrored")
# GraphML edge attributes: (name, type); the boxes are "x0 y0 x1 y1" strings
EDGE_KEYS = (("inliers", "int"), ("kind", "string"), ("box_a", "string"), ("box_b", "string"),
             ("scale", "double"), ("rotation", "double"), ("mirrored", "boolean"))


def rows(matches: Sequence[Match], path_of: dict[int, str]) -> list[dict]:
    """One dict per edge (strongest first); geometry columns are empty when the edge has none stored."""
    out = []
    for m in sorted(matches, key=lambda m: (-m.inliers, m.a, m.b)):
        g = m.geometry
        out.append({"a": m.a, "b": m.b, "path_a": path_of.get(m.a, ""), "path_b": path_of.get(m.b, ""),
                    "inliers": m.inliers, "kind": m.kind,
                    "box_a": " ".join(map(str, g.box_a)) if g else "", "box_b": " ".join(map(str, g.box_b)) if g else "",
                    "scale": g.scale if g else "", "rotation": g.rotation if g else "",
                    "mirrored": g.mirrored if g else ""})
    return out


def to_csv(edges: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(edges)
    return out.getvalue()


def to_json(edges: list[dict]) -> str:
    return json.dumps([{k: (None if v == "" else v) for k, v in e.items()} for e in edges], indent=1)


def to_graphml(edges: list[dict]) -> str:
    """Nodes: image ids with their path; edges: undirected, with the edge's scores as attributes."""
    nodes = {}
    for e in edges:
        nodes.setdefault(e["a"], e["path_a"])
        nodes.setdefault(e["b"], e["path_b"])
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">',
             '<key id="path" for="node" attr.name="path" attr.type="string"/>']
    lines += [f'<key id="{k}" for="edge" attr.name="{k}" attr.type="{t}"/>' for k, t in EDGE_KEYS]
    lines.append('<graph id="matches" edgedefault="undirected">')
    lines += [f'<node id="{i}"><data key="path">{quoteattr(p)[1:-1]}</data></node>' for i, p in nodes.items()]
    for e in edges:
        data = "".join(f'<data key="{k}">{quoteattr(_graphml_value(e[k]))[1:-1]}</data>'
                       for k, _ in EDGE_KEYS if e[k] != "")
        lines.append(f'<edge source="{e["a"]}" target="{e["b"]}">{data}</edge>')
    lines += ["</graph>", "</graphml>"]
    return "\n".join(lines) + "\n"


def _graphml_value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


FORMATS = {"csv": to_csv, "json": to_json, "graphml": to_graphml}
