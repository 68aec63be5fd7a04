"""``make bench-propagation``: derivation trees on the benchmark's propagation set, scored.

    .venv/bin/python -m benchmarks.propagation [--split dev] [--seed N] [--out DIR] [--cache DIR] [--check]
                                               [--trees-only]

1. Generates the set with the benchmark's ``make_propagation.py`` into
   ``.bench/generated-propagation/<split>[-<seed>]`` unless the same generation is cached there
   (same generators, seed, inputs and library versions: :func:`benchmarks.run._stamp`).
2. ``memetrace index images/ --posts posts.csv`` in this process on a fresh data dir (Milvus
   Lite): index, match, cluster, derivation trees; then ``memetrace tree``'s rows as PARENTS.csv
   and the clusters CSV.
3. Scores the trees with ``score_propagation.py`` (with its posting-time baselines) and the
   clusters with ``score.py``; writes ``<out>/propagation.json``. ``--check`` exits 1 when a
   figure is under :data:`FLOOR`.

``--trees-only`` skips step 2's indexing: it redoes every cluster's tree on the data dir a
previous run left in ``<out>/data`` (:func:`redo_trees`), then writes both CSVs and scores, in
seconds instead of minutes: for trying a change to the tree step (keep one ``--out`` per seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.run import DEFAULT_CACHE, GEN_WORKERS, SEED, BenchError, _gt_complete, _stamp, bench_dir, split_dir

if TYPE_CHECKING:
    from memetrace.cli.context import Context

DEFAULT_OUT = DEFAULT_CACHE / "results-propagation"
STAMP = "memetrace-propagation-stamp.json"
#: the floor the quality test holds: under the lowest of the dev, seed 7 and seed 1 figures
#: (docs/propagation.md, 02 Dec: parent 0.720 / 0.747 / 0.774, origin 0.726 / 0.712 / 0.671, cluster
#: F1 0.973 / 0.973 / 0.976), parent by a margin for another CPU's float differences; the issue's
#: targets are parent accuracy 0.85 and origin accuracy 0.97, which the trees do not reach yet
FLOOR = {"parent_accuracy": 0.70, "origin_accuracy": 0.66}
CLUSTER_FLOOR = {"cluster_f1": 0.88}


def generate(bench: Path, split: Path, out: Path, seed: int = SEED) -> tuple[Path, bool]:
    """The propagation set of ``split`` in ``out`` (generated unless cached); (folder, generated now)."""
    stamp = {**_stamp(bench, split, seed),
             "propagation_sha256": hashlib.sha256((bench / "make_propagation.py").read_bytes()).hexdigest()}
    stamp_file = out / STAMP
    truth = out / "propagation.csv"
    if truth.is_file() and stamp_file.is_file() and (out / "posts.csv").is_file():
        try:
            same = json.loads(stamp_file.read_text()) == stamp
        except ValueError:
            same = False
        if same and _gt_complete(out / "ground_truth.csv"):
            return out, False
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(bench / "make_propagation.py"), str(split), "--out", str(out),
                           "--seed", str(seed), "--workers", str(GEN_WORKERS)], capture_output=True, text=True)
    if proc.returncode != 0 or not truth.is_file():
        raise BenchError(f"make_propagation.py failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    stamp_file.write_text(json.dumps(stamp, indent=1))
    return out, True


def run_pipeline(generated: Path, data_dir: Path, parents_csv: Path, clusters_csv: Path) -> dict[str, Any]:
    """index --posts -> match -> cluster -> trees on a fresh ``data_dir``; both CSVs written."""
    from memetrace.cli.batch import run_index
    from memetrace.cli.context import Context
    from memetrace.settings import Settings

    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    c = Context(Settings(data_dir=data_dir, milvus_uri="", cluster_state_path=None))
    try:
        summary = run_index(c, generated / "images", generated / "posts.csv", show_progress=False)
        summary["tree_export_s"] = write_outputs(c, parents_csv, clusters_csv)
    finally:
        c.close()
    return summary


def redo_trees(data_dir: Path, parents_csv: Path, clusters_csv: Path) -> dict[str, Any]:
    """Every cluster's tree redone on an indexed ``data_dir`` (its clusters and matches as they
    are, every pair of a small cluster verified again as the index run does); both CSVs written."""
    from memetrace.cli.context import Context
    from memetrace.clusterer.tree_update import update_trees
    from memetrace.settings import Settings

    settings = Settings(data_dir=data_dir, milvus_uri="", cluster_state_path=None)
    if not settings.resolved_cluster_state_path().is_file():
        raise BenchError(f"--trees-only: no indexed data dir in {data_dir} (run once without it)")
    c = Context(settings)
    try:
        t0 = time.perf_counter()
        state = c.graph_state
        written = update_trees(state, c.features, c.trees, set(state.clusters().values()) | set(c.trees.cluster_ids()),
                               verify=c.verify_pairs)
        summary = {"reused_data_dir": str(data_dir), "trees": written, "tree_s": round(time.perf_counter() - t0, 2)}
        summary["tree_export_s"] = write_outputs(c, parents_csv, clusters_csv)
    finally:
        c.close()
    return summary


def write_outputs(c: Context, parents_csv: Path, clusters_csv: Path) -> float:
    """``memetrace tree``'s rows as ``parents_csv`` and the clusters CSV from the open Context ``c``;
    the seconds the trees' export took."""
    from memetrace.cli.batch import cluster_table
    from memetrace.cli.posts import tree_table
    from memetrace.clusterer.export import write_csv
    from memetrace.clusterer.tree_export import write_tree

    t0 = time.perf_counter()
    write_tree(tree_table(c), parents_csv)
    seconds = round(time.perf_counter() - t0, 2)
    write_csv(cluster_table(c), clusters_csv)
    return seconds


def _score(script: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{script.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def failures(result: dict[str, Any]) -> list[str]:
    t, cl = result["trees"], result["clusters"]
    return ([f"{k} {t[k]:.4f} < {v}" for k, v in FLOOR.items() if t[k] < v]
            + [f"{k} {cl[k]:.4f} < {v}" for k, v in CLUSTER_FLOOR.items() if cl[k] < v])


def run_bench(split: str = "dev", seed: int = SEED, out: Path = DEFAULT_OUT, cache: Path = DEFAULT_CACHE,
              trees_only: bool = False) -> dict[str, Any]:
    bench = bench_dir()
    src = split_dir(bench, split)
    name = (split if split == "dev" else src.name) + ("" if seed == SEED else f"-{seed}")
    t0 = time.perf_counter()
    generated, now = generate(bench, src, cache / "generated-propagation" / name, seed)
    gen_s = round(time.perf_counter() - t0, 2)
    out.mkdir(parents=True, exist_ok=True)
    parents, clusters = out / "parents.csv", out / "clusters.csv"
    summary = (redo_trees if trees_only else partial(run_pipeline, generated))(out / "data", parents, clusters)
    result = {
        "set": {"folder": str(generated), "seed": seed, "generated_now": now, "generation_s": gen_s},
        "pipeline": summary,
        "trees": _score(bench / "score_propagation.py", str(generated / "propagation.csv"), str(parents),
                        "--baselines", str(generated / "posts.csv")),
        "clusters": _score(bench / "score.py", str(generated / "ground_truth.csv"), str(clusters)),
    }
    result["failures"] = failures(result)
    (out / "propagation.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--check", action="store_true", help="exit 1 when a figure is under the floor")
    ap.add_argument("--trees-only", action="store_true",
                    help="redo only the trees on the data dir a previous run left in OUT/data")
    a = ap.parse_args(argv)
    try:
        r = run_bench(a.split, a.seed, a.out.resolve(), a.cache.resolve(), a.trees_only)
    except BenchError as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 2
    t = r["trees"]
    print(json.dumps({k: t[k] for k in ("parent_accuracy", "origin_accuracy", "edge_f1_undirected",
                                        "ancestry_f1", "simnlo")} | {"by_edit": t["parent_accuracy_by_edit"],
                     "cluster_f1": r["clusters"].get("cluster_f1"), "failures": r["failures"]}, indent=1))
    return 1 if a.check and r["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
