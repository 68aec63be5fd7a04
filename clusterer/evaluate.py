"""Score a clusters CSV against a ground truth, with the benchmark's (and PIMMI's) metrics.

Ground truth CSV: ``path,group_id`` and optional ``role`` (``original``, ``copy``, ``distractor``)
and ``transform`` columns, other columns ignored; an empty ``group_id`` marks a distractor (an image
with no copies), and so does ``role=distractor`` whatever its ``group_id`` (a warning says how many
rows carried one: scored as one-image groups they would raise the scores). Clusters CSV:
``path,cluster_id`` as written by :func:`clusterer.export.write_csv`. A prediction path may be relative to the ground
truth's folder, absolute, or a bare file name (when that name is unique in the ground truth).
Ground-truth images missing from the prediction, or with an empty ``cluster_id``, are singletons;
prediction rows naming no ground-truth image are counted, not scored.

Metrics (the definitions of the benchmark's ``score.py``):

* ``cluster_precision/recall/f1`` -- PIMMI's best-matching macro average: each ground-truth group
  is paired with the predicted cluster of highest F1 among those holding its members
  (precision = shared / cluster size, recall = shared / group size), averaged over groups.
  ``cluster_*_all`` averages over groups and distractors, each distractor its own group.
* ``query_average_precision`` -- PIMMI's ``eval --query-column``, needs a ``role`` column: for each
  ``original``, the share of the non-original images of its cluster that are in its group (0 for
  a singleton or a cluster with no other non-original), averaged over originals.
* ``pairwise_precision/recall/f1`` -- over image pairs put in one cluster vs. in one true group
  (each distractor alone).
* ``copy_with_original_rate_per_transform`` -- needs ``role`` and ``transform``: per transform
  family, the share of copies put in their original's cluster; a chain of transforms (``a > b``)
  counts as the family ``chain``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHAIN = "chain"  # the transform family of a copy made by several transforms in a row ("a > b")


@dataclass(frozen=True)
class Truth:
    """The ground truth, one entry per image in file order (paths normalised)."""

    paths: list[str]
    group: dict[str, str | None]  # None: distractor
    role: dict[str, str] | None  # None when the file has no role column
    transform: dict[str, str] | None = None  # None when the file has no transform column


def _read_rows(path: Path, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a CSV; ValueError naming the file when a required column is missing."""
    with Path(path).open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        for name in required:
            if name not in columns:
                raise ValueError(f"{path}: missing column {name!r} (columns: {', '.join(columns) or 'none'})")
        reader.fieldnames = columns
        return columns, list(reader)


def normalise(path: str, root: str) -> str:
    """A path as the ground truth spells it: relative to ``root``, normalised."""
    path = path.strip()
    if not path:
        return path
    if os.path.isabs(path):
        path = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    return os.path.normpath(path)


def read_truth(path: Path, root: str) -> Truth:
    """Parse the ground-truth CSV."""
    columns, rows = _read_rows(path, ["path", "group_id"])
    paths: list[str] = []
    group: dict[str, str | None] = {}
    role: dict[str, str] = {}
    transform: dict[str, str] = {}
    grouped_distractors = 0
    for line, row in enumerate(rows, start=2):
        p = normalise(row["path"] or "", root)
        if not p:
            raise ValueError(f"{path}: line {line}: empty path")
        if p in group:
            raise ValueError(f"{path}: line {line}: path {p!r} listed twice")
        paths.append(p)
        role[p] = (row.get("role") or "").strip()
        group[p] = (row["group_id"] or "").strip() or None
        if role[p] == "distractor" and group[p] is not None:
            grouped_distractors += 1
            group[p] = None  # a distractor has no copies: never a group, even of one
        transform[p] = (row.get("transform") or "").strip()
    if grouped_distractors:
        log.warning(f"{path}: {grouped_distractors} rows with role=distractor carry a group_id: scored as "
                    "distractors (no group), as their role says")
    return Truth(paths, group, role if "role" in columns else None,
                 transform if "transform" in columns else None)


def read_prediction(path: Path, truth: Truth, root: str) -> tuple[dict[str, Hashable], int]:
    """Predicted label of every ground-truth image, and the number of unmatched prediction rows."""
    known = set(truth.paths)
    by_name: dict[str, list[str]] = {}
    for p in truth.paths:
        by_name.setdefault(os.path.basename(p), []).append(p)

    def resolve(raw: str) -> str | None:
        p = normalise(raw, root)
        if p in known:
            return p
        same_name = by_name.get(os.path.basename(raw.strip()), [])
        return same_name[0] if len(same_name) == 1 else None

    label: dict[str, Hashable] = {}
    unknown = 0
    for row in _read_rows(path, ["path", "cluster_id"])[1]:
        p = resolve(row["path"] or "")
        if p is None:
            unknown += 1
            continue
        cid = (row["cluster_id"] or "").strip()
        if cid:
            label[p] = ("cluster", cid)
    for i, p in enumerate(truth.paths):
        label.setdefault(p, ("singleton", i))
    return label, unknown


def f1(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when both are 0."""
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def best_match_macro(groups: list[list[str]], label: dict[str, Hashable],
                     sizes: Counter) -> tuple[float, float, float]:
    """PIMMI's best-matching macro (precision, recall, F1) of true groups against clusters.

    Candidates are the clusters of the group's members, in order of first member; the first of
    highest F1 wins.
    """
    totals = [0.0, 0.0, 0.0]
    for members in groups:
        shared = Counter(label[p] for p in members)
        best: tuple[float, float, float] | None = None
        for cluster, n in shared.items():
            p, r = n / sizes[cluster], n / len(members)
            score = (p, r, f1(p, r))
            if best is None or score[2] > best[2]:
                best = score
        assert best is not None  # groups are never empty
        totals = [t + s for t, s in zip(totals, best)]
    n = len(groups)
    return (totals[0] / n, totals[1] / n, totals[2] / n) if n else (0.0, 0.0, 0.0)


def query_average_precision(truth: Truth, label: dict[str, Hashable], sizes: Counter) -> float:
    """PIMMI's ``--query-column`` score: originals are the queries (see module docstring)."""
    assert truth.role is not None
    members: dict[Hashable, list[str]] = {}
    for p in truth.paths:
        if truth.role[p] != "original":
            members.setdefault(label[p], []).append(p)
    scores = []
    for p in truth.paths:
        if truth.role[p] != "original":
            continue
        others = members.get(label[p], []) if sizes[label[p]] > 1 else []
        hits = sum(1 for q in others if truth.group[q] == truth.group[p])
        scores.append(hits / len(others) if others else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def copy_with_original_rate(truth: Truth, label: dict[str, Hashable]) -> dict[str, float]:
    """Per transform family, the share of copies in the same cluster as their group's original."""
    assert truth.role is not None and truth.transform is not None
    original = {truth.group[p]: p for p in truth.paths if truth.role[p] == "original"}
    hits: dict[str, list[int]] = {}
    for p in truth.paths:
        if truth.role[p] != "copy":
            continue
        family = CHAIN if ">" in truth.transform[p] else truth.transform[p]
        o = original.get(truth.group[p])
        counts = hits.setdefault(family, [0, 0])
        counts[0] += o is not None and label[p] == label[o]
        counts[1] += 1
    return {family: n / total for family, (n, total) in sorted(hits.items())}


def pairs(n: int) -> int:
    """Unordered pairs among n items."""
    return n * (n - 1) // 2


def pairwise(truth: Truth, label: dict[str, Hashable], sizes: Counter) -> tuple[float, float, float]:
    """Precision, recall, F1 of same-cluster pairs against same-group pairs (distractors alone)."""
    true_label = {p: truth.group[p] or ("distractor", p) for p in truth.paths}
    both = sum(pairs(n) for n in Counter((true_label[p], label[p]) for p in truth.paths).values())
    predicted = sum(pairs(n) for n in sizes.values())
    actual = sum(pairs(n) for n in Counter(true_label.values()).values())
    precision = both / predicted if predicted else 0.0
    recall = both / actual if actual else 0.0
    return precision, recall, f1(precision, recall)


def evaluate(ground_truth: Path, clusters: Path, root: Path | None = None) -> dict[str, float | int | dict]:
    """All metrics of ``clusters`` against ``ground_truth`` (``root``: GT paths' folder, default its own).

    ``query_average_precision`` is present only when the ground truth has a ``role`` column,
    ``copy_with_original_rate_per_transform`` when it has ``role`` and ``transform``.
    """
    base = str(root) if root is not None else os.path.dirname(os.path.abspath(ground_truth))
    truth = read_truth(ground_truth, base)
    label, unknown = read_prediction(clusters, truth, base)
    sizes = Counter(label.values())

    by_group: dict[str, list[str]] = {}
    for p in truth.paths:
        if truth.group[p] is not None:
            by_group.setdefault(truth.group[p], []).append(p)
    groups = [by_group[g] for g in sorted(by_group)]
    distractors = [[p] for p in truth.paths if truth.group[p] is None]

    out: dict[str, float | int | dict] = {
        "images": len(truth.paths),
        "groups": len(groups),
        "distractors": len(distractors),
        "predicted_nonsingleton_clusters": sum(1 for n in sizes.values() if n > 1),
        "unknown_paths_in_prediction": unknown,
    }
    for suffix, scored in (("", groups), ("_all", groups + distractors)):
        p, r, f = best_match_macro(scored, label, sizes)
        out |= {f"cluster_precision{suffix}": p, f"cluster_recall{suffix}": r, f"cluster_f1{suffix}": f}
    if truth.role is not None:
        out["query_average_precision"] = query_average_precision(truth, label, sizes)
    p, r, f = pairwise(truth, label, sizes)
    out |= {"pairwise_precision": p, "pairwise_recall": r, "pairwise_f1": f}
    if truth.role is not None and truth.transform is not None:
        out["copy_with_original_rate_per_transform"] = copy_with_original_rate(truth, label)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m clusterer.evaluate GROUND_TRUTH.csv CLUSTERS.csv``: print the metrics as JSON."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m clusterer.evaluate GROUND_TRUTH.csv CLUSTERS.csv", file=sys.stderr)
        return 2
    result = evaluate(Path(args[0]), Path(args[1]))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
