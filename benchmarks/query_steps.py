"""Where a "copies of this image" query's time goes: :mod:`benchmarks.query_scale` (or
:mod:`benchmarks.query`) run with each step of every query timed and each store read counted.

    nice .venv/bin/python -m benchmarks.query_steps scale --sizes 10000 --limit 60 --consistency Bounded
    nice .venv/bin/python -m benchmarks.query_steps query --limit 100 --http-sample 0

Every read of the vector index (Milvus: one round trip each) and of the feature store, the
keypoint decoding, the verification and the low-texture rule are wrapped by a timer, as they run
inside :meth:`memetrace.matcher.query.CopyFinder.find` / ``find_stored``; per run of queries
(query_scale: upload, then stored, at each size in turn), the median and 99th percentile over the
queries of each step's total time in a query, and the mean number of calls a query makes
(``steps.json`` in ``--out``, else here, and printed); every query's answers in ``answers.json``
(to check that a change of the query path answers the same). Steps nest (a keypoint read includes
its decoding) and overlap (reads issued together, :mod:`memetrace.parallel`): they do not sum to
the end to end time.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: (owner: module:class, or module, attribute, step name) of every call timed
STEPS = [
    ("memetrace.matcher.query", "decode", "decode (upload)"),  # a module's function: where the query path calls it
    ("memetrace.embedder:Embedder", "embed", "embed (upload)"),
    ("memetrace.keypoints:KeypointExtractor", "extract", "SIFT (upload)"),
    ("memetrace.milvus:MilvusVectorIndex", "search_images", "milvus.search_images"),
    ("memetrace.milvus:MilvusVectorIndex", "search_regions", "milvus.search_regions"),
    ("memetrace.milvus:MilvusVectorIndex", "get", "milvus.get"),
    ("memetrace.milvus:MilvusVectorIndex", "vectors", "milvus.vectors"),
    ("memetrace.vector_index:VectorIndex", "candidates", "candidates (all searches)"),
    ("memetrace.feature_store:FeatureStore", "get_keypoints", "features.get_keypoints"),
    ("memetrace.feature_store:FeatureStore", "get_thumbnail", "features.get_thumbnail"),
    ("memetrace.kpcodec:KeypointCodec", "decode", "keypoints decode"),
    ("memetrace.matcher.verify:Verifier", "verify_many", "verify_many"),
    ("memetrace.matcher.matching:Matcher", "_low_texture", "low-texture rule"),
    ("memetrace.matcher.matching:Matcher", "_geometries", "geometries"),
    ("memetrace.matcher.query:CopyFinder", "find", "end to end"),
    ("memetrace.matcher.query:CopyFinder", "find_stored", "end to end"),
]

_current: dict[str, list[float]] = defaultdict(list)  # the running query's calls: step -> seconds
_answers: list[list[tuple]] = []  # every query's copies (id, inliers, kind, similarity, mirrored, geometry)
#: each run of consecutive queries of one kind (query_scale: upload then stored, at each size): its calls
_runs: list[tuple[str, list[dict[str, list[float]]]]] = []


def _timed(fn: Callable[..., Any], name: str, kind: str | None) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if kind is not None:
            _current.clear()
        t = time.perf_counter()
        try:
            found = fn(*args, **kwargs)
            if kind is not None:
                _answers.append([(c.image_id, c.inliers, c.kind, c.similarity, c.mirrored,
                                  c.geometry and c.geometry.to_dict()) for c in found[1]])
            return found
        finally:
            _current[name].append(time.perf_counter() - t)
            if kind is not None:
                if not _runs or _runs[-1][0] != kind:
                    _runs.append((kind, []))
                _runs[-1][1].append(dict(_current))

    return call


def install() -> None:
    """Wrap every step of :data:`STEPS` (class attributes: every instance is timed)."""
    import importlib

    for owner, attr, name in STEPS:
        module, _, cls = owner.partition(":")
        holder = importlib.import_module(module)
        holder = getattr(holder, cls) if cls else holder
        kind = {"find": "upload", "find_stored": "stored"}.get(attr) if cls == "CopyFinder" else None
        setattr(holder, attr, _timed(getattr(holder, attr), name, kind))


def summary() -> dict[str, dict[str, dict[str, float]]]:
    """Per run of queries (``upload 1``, ``stored 1``, ``upload 2``...) and step: p50 / p99 of its time
    per query (ms), mean calls per query."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r, (kind, queries) in enumerate(_runs):
        names = sorted({n for q in queries for n in q}, key=[s[2] for s in STEPS].index)
        kind = f"{kind} (run {r + 1})"
        out[kind] = {}
        for n in names:
            ms = np.array([sum(q.get(n, [])) for q in queries]) * 1000
            out[kind][n] = {"p50_ms": round(float(np.percentile(ms, 50)), 1),
                            "p99_ms": round(float(np.percentile(ms, 99)), 1),
                            "mean_ms": round(float(ms.mean()), 1),
                            "calls": round(float(np.mean([len(q.get(n, [])) for q in queries])), 2)}
        out[kind]["queries"] = {"n": len(queries)}  # type: ignore[dict-item]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("scale", "query"):
        print("usage: python -m benchmarks.query_steps scale|query [the benchmark's options]", file=sys.stderr)
        return 2
    install()
    if argv[0] == "scale":
        from benchmarks.query_scale import main as bench
    else:
        from benchmarks.query import main as bench
    rc = bench(argv[1:])
    result = summary()
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path(".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.json").write_text(json.dumps(result, indent=2))
    (out / "answers.json").write_text(json.dumps(_answers))
    for kind, steps in result.items():
        print(f"\n{kind} ({steps['queries']['n']} queries): step, p50 / p99 / mean ms a query, calls a query")
        for n, s in steps.items():
            if n != "queries":
                print(f"  {n:28} {s['p50_ms']:>7} / {s['p99_ms']:>7} / {s['mean_ms']:>7} ms  {s['calls']:>6}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
