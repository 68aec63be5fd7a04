"""``make bench-scale``: the clusterer at 10 k, 100 k and 1 M images, on a synthetic stream; then
the query latency against a Milvus server (:mod:`benchmarks.query_scale`) and the long run of the
streaming services (:mod:`benchmarks.longrun`), each in a process of its own; one table, one PNG.

    .venv/bin/python -m benchmarks.scale [--sizes 10000 100000 1000000] [--new 10000] [--out DIR]
        [--query-sizes 10000 100000] [--longrun-minutes 20] [--reuse: redraw from DIR's JSON files]

What is simulated and what is real: the image and edge *stream* is synthetic (nothing is downloaded,
decoded or matched; the edges are what the matcher would have verified); the clusterer, its SQLite
state file and every reclustering run are the real code (:func:`memetrace.clusterer.service.recluster`
on a :class:`~memetrace.clusterer.state.SqliteGraphState`), timed and measured as they are.

The stream (:func:`generate`) has the shapes the issue names, all seeded:

- most images are singletons (``singletons``, 70 %: nobody copied them);
- the others form clusters whose sizes follow a Zipf law (exponent ``zipf``, heavy-tailed, capped at
  ``max_cluster``);
- bursts: a cluster's copies arrive around its first post, their delays exponential with mean
  ``burst_s`` (an hour), while clusters and singletons start uniformly over ``days``;
- edges: each copy, when it arrives, matches ``k`` earlier copies of its cluster chosen at random
  (``k`` exponential with the mean that gives ``edges_per_image`` edges per image overall, 5 for the
  issue's 1 M images and 5 M edges); a small share (``bridges``) joins two clusters (a partial or
  false match: the merges and the larger components the clusterer must handle);
- one post per image (platforms drawn from four), as the clusterer service sees them.

Vectors (:func:`near_vectors`, for what the query side would index): each cluster's copies are drawn
around one real descriptor (``real``: e.g. the dev split's global vectors read from its Milvus),
plus Gaussian noise scaled so that a copy lies from its original at the distance observed between
real copies of the split (``copy_distance``), and a singleton at the distance between real unrelated
neighbours (``far_distance``); each vector is then L2-normalised like the embedder's.

Measured per N: the base of N images (with about 5 N edges) is fed and reclustered in runs of
``--chunk`` images, as a clusterer service would over time; then a fresh process (a restart: it
resumes from the file) adds ``--new`` images with their edges and posts and runs one reclustering,
reporting its seconds, the images it touched, and its peak RSS (``ru_maxrss``: the whole process,
Python included). The state file's bytes per edge and per image come from SQLite's ``dbstat``
(per table and index) after a checkpoint. The figures and a PNG of the cost curves go to ``--out``
and ``docs/scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from memetrace.clusterer.service import recluster
from memetrace.clusterer.state import SqliteGraphState
from memetrace.models import Match

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".bench" / "scale"
PNG = ROOT / "docs" / "scale.png"
PLATFORMS = ("x", "telegram", "facebook", "reddit")
T0 = 1_700_000_000  # the stream's first second (unix s)


@dataclass(frozen=True)
class Shape:
    singletons: float = 0.7
    zipf: float = 2.0
    max_cluster: int = 5000
    edges_per_image: float = 5.0
    bridges: float = 0.001  # share of edges joining two clusters
    burst_s: float = 3600.0
    days: float = 30.0


@dataclass
class Stream:
    """Images in arrival order; each edge arrives with its later image (``edge_at``: its index)."""
    image_ids: np.ndarray  # int64, unique 63-bit like memetrace's
    arrival: np.ndarray  # unix s, non-decreasing
    cluster: np.ndarray  # the true cluster of each image, -1: a singleton
    edges: np.ndarray  # (E, 3) int64: a index, b index (positions in the stream), inliers
    edge_at: np.ndarray  # stream position at which each edge is known: max(a, b)

    def images(self, lo: int, hi: int) -> list[tuple[int, int]]:
        return [(int(i), 300) for i in self.image_ids[lo:hi]]

    def posts(self, lo: int, hi: int) -> list[tuple[str, int, int, str]]:
        return [(f"p{k}", int(self.image_ids[k]), int(self.arrival[k]), PLATFORMS[k % len(PLATFORMS)])
                for k in range(lo, hi)]

    def matches(self, lo: int, hi: int) -> list[Match]:
        """The edges that arrive with the images at positions lo..hi-1."""
        sel = self.edges[(self.edge_at >= lo) & (self.edge_at < hi)]
        ids = self.image_ids
        return [Match(int(ids[a]), int(ids[b]), int(n), "full" if n >= 20 else "partial") for a, b, n in sel]


def generate(n_images: int, seed: int = 0, shape: Shape = Shape()) -> Stream:
    """A stream of ``n_images`` with the module docstring's shapes."""
    rng = np.random.default_rng(seed)
    sizes = _cluster_sizes(round(n_images * (1 - shape.singletons)), shape, rng)
    n_clustered = int(sizes.sum())
    cluster = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), np.full(n_images - n_clustered, -1)])
    start = rng.uniform(0, shape.days * 86400, len(sizes))
    first = np.r_[0, np.cumsum(sizes)[:-1]]  # each cluster's first copy arrives at its start
    delay = rng.exponential(shape.burst_s, n_clustered)
    delay[first] = 0
    arrival = np.concatenate([start[cluster[:n_clustered]] + delay,
                              rng.uniform(0, shape.days * 86400, n_images - n_clustered)])
    order = np.argsort(arrival, kind="stable")
    cluster, arrival = cluster[order], T0 + arrival[order].astype(np.int64)
    ids = _unique_ids(n_images, rng)
    want = round(n_images * shape.edges_per_image)
    edges = _edges(cluster, want, shape, rng)
    if 0 < len(edges) < want:  # repeated draws of one pair are dropped: aim once more, higher
        edges = _edges(cluster, round(want * want / len(edges)), shape, rng)
    return Stream(ids, arrival, cluster, edges, edges[:, :2].max(axis=1))


def _cluster_sizes(n_clustered: int, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    sizes: list[np.ndarray] = []
    total = 0
    while total < n_clustered:
        s = np.minimum(1 + rng.zipf(shape.zipf, 4096), shape.max_cluster)  # 2+ images each
        sizes.append(s)
        total += int(s.sum())
    out = np.concatenate(sizes)
    out = out[np.cumsum(out) <= n_clustered]
    rest = n_clustered - int(out.sum())
    return np.r_[out, rest] if rest >= 2 else out


def _unique_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    ids = np.unique(rng.integers(1, 2**63 - 1, int(n * 1.01) + 16, dtype=np.int64))
    return rng.permutation(ids)[:n]


def _edges(cluster: np.ndarray, n_edges: int, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Each copy's edges to earlier copies of its cluster, then the bridges; (a, b, inliers), a < b."""
    pos = np.flatnonzero(cluster >= 0)
    by_cluster = pos[np.argsort(cluster[pos], kind="stable")]  # per cluster, in arrival order
    c = cluster[by_cluster]
    starts = np.r_[0, np.flatnonzero(np.diff(c)) + 1]
    rank = np.arange(len(c)) - np.repeat(starts, np.diff(np.r_[starts, len(c)]))  # earlier copies
    want = rng.exponential(1.0, len(c))
    inside = round(n_edges * (1 - shape.bridges))
    lo, hi = 0.0, float(n_edges)
    for _ in range(40):  # the mean k that gives the wanted number of edges (their total grows with it)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(rank, np.ceil(mid * want)).sum() < inside else (lo, mid)
    k = np.minimum(rank, np.ceil(hi * want)).astype(np.int64)
    src = np.repeat(np.arange(len(c)), k)
    earlier = (rng.random(len(src)) * rank[src]).astype(np.int64)  # with repeats, dropped below
    dst = src - rank[src] + earlier
    a, b = by_cluster[dst], by_cluster[src]
    n_bridges = n_edges - inside
    x, y = rng.choice(pos, n_bridges), rng.choice(pos, n_bridges)
    keep = cluster[x] != cluster[y]
    a, b = np.r_[a, x[keep]], np.r_[b, y[keep]]
    inliers = np.r_[20 + rng.geometric(0.05, len(a) - int(keep.sum())), 10 + rng.integers(0, 8, int(keep.sum()))]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b), inliers], axis=1)
    _, first = np.unique(pairs[:, 0] * len(cluster) + pairs[:, 1], return_index=True)
    return pairs[np.sort(first)]


def near_vectors(stream: Stream, real: np.ndarray, copy_distance: float, far_distance: float,
                 seed: int = 0) -> np.ndarray:
    """One L2-normalised vector per image near a row of ``real`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    base, distance = bases(stream, len(real), copy_distance, far_distance, rng)
    return noisy(real[base], distance, rng)


def bases(stream: Stream, n_real: int, copy_distance: float, far_distance: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per image of ``stream``: the row of the real vectors it is drawn near (one per cluster, any for
    a singleton) and its distance from it (``copy_distance`` for a copy, ``far_distance`` else)."""
    base_of_cluster = rng.integers(0, n_real, int(stream.cluster.max()) + 1)
    base = np.where(stream.cluster >= 0, base_of_cluster[np.maximum(stream.cluster, 0)],
                    rng.integers(0, n_real, len(stream.cluster)))
    return base, np.where(stream.cluster >= 0, copy_distance, far_distance)


def noisy(rows: np.ndarray, distance: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """``rows`` plus Gaussian noise, L2-normalised: per-dimension sigma d / sqrt(2 dim) puts two noisy
    draws of one row about d apart (``distance``: one d per row, or one for all)."""
    sigma = np.broadcast_to(np.asarray(distance, np.float32), rows.shape[:1]) / np.sqrt(2 * rows.shape[-1])
    shape = (-1,) + (1,) * (rows.ndim - 1)
    v = rows + rng.standard_normal(rows.shape).astype(np.float32) * sigma.reshape(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- measuring


def feed(state: SqliteGraphState, stream: Stream, lo: int, hi: int) -> None:
    """Images lo..hi-1 as the clusterer service stores them: images, posts, then their edges."""
    state.add_images(stream.images(lo, hi))
    state.add_posts(stream.posts(lo, hi))
    state.add_matches(stream.matches(lo, hi))


def build(path: Path, stream: Stream, n: int, chunk: int) -> dict:
    """The base: the stream's first ``n`` images fed and reclustered in runs of ``chunk``."""
    state = SqliteGraphState(path)
    t0, runs = time.perf_counter(), []
    for lo in range(0, n, chunk):
        feed(state, stream, lo, min(n, lo + chunk))
        runs.append(recluster(state, "components", now=float(stream.arrival[min(n, lo + chunk) - 1])).seconds)
    state.file.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    state.close()
    return {"build_s": round(time.perf_counter() - t0, 1), "build_runs": len(runs),
            "build_run_s_max": round(max(runs), 3)}


def store_bytes(path: Path) -> dict[str, int]:
    """Bytes per table or index of the state file (SQLite's dbstat)."""
    state = SqliteGraphState(path)
    try:
        return dict(state.file.read("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
    finally:
        state.close()


def measure_run(path: Path, arrivals: Path, algorithm: str) -> dict:
    """In this process (a fresh one, holding only the new arrivals): store them and recluster once."""
    new = json.loads(arrivals.read_text())
    state = SqliteGraphState(path)
    t0 = time.perf_counter()
    state.add_images(map(tuple, new["images"]))
    state.add_posts(map(tuple, new["posts"]))
    state.add_matches(Match(*m) for m in new["matches"])
    fed = time.perf_counter() - t0
    run = recluster(state, algorithm, now=new["now"])
    state.close()
    return {"feed_s": round(fed, 3), "recluster_s": round(run.seconds, 3), "images_touched": run.images_touched,
            "clusters_touched": len(run.touched), "events": len(run.events), "clusters": run.clusters,
            "largest": run.largest, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def one_size(n: int, new: int, chunk: int, seed: int, work: Path, algorithm: str, repeat: int = 1) -> dict:
    """The base of ``n``, then ``repeat`` measured runs, each on a fresh copy of it: the median run
    is reported (the others too: a shared machine's load moves one by several times)."""
    stream = generate(n + new, seed)
    path = work / f"state-{n}.db"
    path.unlink(missing_ok=True)
    built = build(path, stream, n, chunk)
    sizes = store_bytes(path)
    edges = int((stream.edge_at < n).sum())
    arrivals = work / f"new-{n}.json"
    arrivals.write_text(json.dumps({"images": stream.images(n, n + new), "posts": stream.posts(n, n + new),
                                    "matches": [[m.a, m.b, m.inliers, m.kind] for m in stream.matches(n, n + new)],
                                    "now": float(stream.arrival[n + new - 1])}))
    runs = []
    for _ in range(repeat):
        copy = shutil.copyfile(path, work / f"run-{n}.db")  # checkpointed: the file is the whole state
        args = [sys.executable, "-m", "benchmarks.scale", "--_measure", str(copy), str(arrivals), algorithm]
        out = subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["recluster_s"])
    measured = {**runs[len(runs) // 2], "recluster_s_all": [r["recluster_s"] for r in runs]}
    total = sum(sizes.values())
    edge_tables = sizes.get("matches", 0) + sizes.get("matches_b", 0)
    return {**measured, "images": n, "edges": edges, "new_images": new, **built, "file_bytes": total,
            "bytes_per_image": round(total / n, 1), "edge_bytes_per_edge": round(edge_tables / max(edges, 1), 1),
            "file_bytes_per_edge": round(total / max(edges, 1), 1), "tables": sizes}


def cpu() -> dict:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags}


def draw(result: dict, png: Path) -> bool:
    """The cost curves of every part present in ``result``; False (nothing drawn) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, query, longrun = result["rows"], result.get("query"), result.get("longrun")
    n = [r["images"] for r in rows]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4))
    speed, p99, space, run_s, memory = axes
    speed.plot(n, [r["new_images"] / (r["feed_s"] + r["recluster_s"]) for r in rows], "o-",
               label="clusterer: store + recluster 10 k new (sim. stream)")
    if longrun and longrun["windows"]:
        w = longrun["windows"][longrun.get("warmup", 3):] or longrun["windows"]
        stored = sum(x["images_stored"] for x in longrun["windows"])
        speed.plot([max(stored, 1)], [np.mean([x["images_stored"] for x in w]) / longrun.get("every", 60)], "s",
                   label="ingest+match+cluster services (real posts, long run)")
    if query:
        for kind, level in sorted({(r.get("query", "upload"), r["consistency"]) for r in query["rows"]}):
            q = [r for r in query["rows"] if (r.get("query", "upload"), r["consistency"]) == (kind, level)]
            p99.plot([r["images"] for r in q], [r["end_to_end"]["p99_ms"] for r in q], "o-",
                     label=f"{kind} end to end, {level}")
            if kind == "upload":  # a stored search's candidate searches are the same ones
                p99.plot([r["images"] for r in q], [r["candidates"]["p99_ms"] for r in q], "x--",
                         label=f"candidates, {level}")
        q = [r for r in query["rows"] if r.get("query", "upload") == "upload"]
        memory.plot([r["images"] for r in q], [r["milvus_rss_mb"] for r in q], "s-",
                    label=f"Milvus server ({query['index_type']})")
    space.plot(n, [r["bytes_per_image"] for r in rows], "o-", label="clusterer state file")
    med = [r["recluster_s"] for r in rows]
    spread = [[m - min(r.get("recluster_s_all", [m])) for m, r in zip(med, rows)],
              [max(r.get("recluster_s_all", [m])) - m for m, r in zip(med, rows)]]
    run_s.errorbar(n, med, yerr=spread, fmt="o-", capsize=3,
                   label=f"run after {rows[0]['new_images']:,} new images (median, min-max)")
    speed.set_yscale("log")
    memory.plot(n, [r["peak_rss_mb"] for r in rows], "o-", label="clusterer process (peak)")
    titles = ("images / s", "p99 query ms (real Milvus server, sim. neighbours)", "bytes per image",
              "reclustering seconds (sim. stream)", "resident memory (MB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("images (N)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a part not measured leaves its panel empty
            ax.legend(fontsize=7)
    fig.suptitle(f"memetrace at scale on {result['cpu']['model']} ({result['cpu']['cores']} cores, shared). SIMULATED: "
                 "the clusterer's image/edge/post stream and the Milvus neighbours beyond the dev split; REAL: the "
                 "clusterer + SQLite, the Milvus server, the split's queries, the long run's services", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    return True


def report(result: dict) -> str:
    rows = result["rows"]
    head = f"{'N images':>10} {'edges':>10} {'run s':>7} {'touched':>8} {'RSS MB':>7} {'B/edge':>7} {'B/image':>8}"
    lines = ["clusterer (simulated stream, real code):", head]
    lines += [f"{r['images']:>10,} {r['edges']:>10,} {r['recluster_s']:>7} {r['images_touched']:>8,} "
              f"{r['peak_rss_mb']:>7} {r['file_bytes_per_edge']:>7} {r['bytes_per_image']:>8}" for r in rows]
    if q := result.get("query"):
        lines.append(f"query latency (real Milvus server, {q['index_type']}, synthetic neighbours beyond the "
                     f"{q['real_images']} real images):")
        lines += [f"{r['images']:>10,} {r.get('query', 'upload'):>6} {r['consistency']:>8}: found {r['found']}/{r['queries']}, end to end p50 "
                  f"{r['end_to_end']['p50_ms']} / p99 {r['end_to_end']['p99_ms']} ms, candidates p50 "
                  f"{r['candidates']['p50_ms']} / p99 {r['candidates']['p99_ms']} ms, Milvus RSS {r['milvus_rss_mb']} MB"
                  for r in q["rows"]]
    if lr := result.get("longrun"):
        lines.append(f"long run ({lr['minutes']} min, real services, posts from the dev split's files): "
                     f"{json.dumps(lr['summary'])}")
    return "\n".join(lines)


PARTS = {"query": ("benchmarks.query_scale", "query-scale.json"), "longrun": ("benchmarks.longrun", "longrun.json")}


def run_part(name: str, args: list[str], out: Path) -> dict | None:
    """benchmarks.query_scale or .longrun in a process of its own, writing under ``out``; its JSON."""
    module, file = PARTS[name]
    done = subprocess.run([sys.executable, "-m", module, *args, "--out", str(out)], cwd=ROOT)
    path = out / file
    if done.returncode or not path.is_file():
        print(f"{module} failed (exit {done.returncode}): its part is left out", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--new", type=int, default=10_000, help="images added before the measured run")
    ap.add_argument("--chunk", type=int, default=100_000, help="images per run while building the base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--algorithm", default="components", choices=["components", "louvain"])
    ap.add_argument("--repeat", type=int, default=3, help="measured runs per size, each on a copy of the base")
    ap.add_argument("--query-sizes", type=int, nargs="*", default=[10_000, 100_000],
                    help="images in the Milvus server (benchmarks.query_scale); none: skip")
    ap.add_argument("--longrun-minutes", type=float, default=20, help="benchmarks.longrun; 0: skip")
    ap.add_argument("--reuse", action="store_true",
                    help="take every part from the JSON files already in --out instead of measuring (redraw)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--png", type=Path, default=PNG)
    ap.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._measure:
        path, arrivals, algorithm = a._measure
        print(json.dumps(measure_run(Path(path), Path(arrivals), algorithm)))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    if a.reuse:
        result = json.loads((a.out / "scale.json").read_text())
        for name, (_, file) in PARTS.items():
            if (a.out / file).is_file():
                result[name] = json.loads((a.out / file).read_text())
    else:
        with tempfile.TemporaryDirectory(dir=a.out) as work:
            rows = [one_size(n, a.new, min(a.chunk, n), a.seed, Path(work), a.algorithm, a.repeat) for n in a.sizes]
        result = {"simulated": "the image/edge/post stream (benchmarks/scale.py generate)",
                  "real": "recluster() on SqliteGraphState, timed in a fresh process", "shape": asdict(Shape()),
                  "seed": a.seed, "algorithm": a.algorithm, "cpu": cpu(), "rows": rows}
        (a.out / "scale.json").write_text(json.dumps(result, indent=2))
        if a.query_sizes:
            result["query"] = run_part("query", ["--sizes", *map(str, a.query_sizes)], a.out)
        if a.longrun_minutes:
            result["longrun"] = run_part("longrun", ["--minutes", str(a.longrun_minutes)], a.out)
    print(report(result))
    print(f"cpu: {result['cpu']}")
    drawn = draw(result, a.png)
    print(f"figures: {a.out}" + (f"; curves: {a.png}" if drawn else "; no matplotlib: no PNG"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
