"""Query latency at scale (issue 12 item 4): "copies of this image" against a real Milvus server
holding the dev split plus synthetic neighbours, up to ``--sizes`` images.

    nice .venv/bin/python -m benchmarks.query_scale [--sizes 100000 300000] [--index IVF_SQ8] [--limit 200]

Real: a Milvus 2.3 standalone server (benchmarks.services.start_milvus_server, the tests'
``milvus_server_uri``), the dev split's originals and distractors indexed into it by the batch
pipeline (``run_index``), and every query, timed one by one in this process through
:class:`memetrace.matcher.query.CopyFinder`: ``--limit`` copies never indexed, uploaded
(``find``, as ``POST /v1/search``: decode, embed, SIFT, the three candidate searches,
verification), and ``--limit`` more copies indexed with the split and searched by id
(``find_stored``, as ``GET /v1/images/{id}/copies``: their stored vectors and keypoints, the
candidate searches, verification).

Simulated: the extra images. Their global vectors follow :func:`benchmarks.scale.generate`'s
shapes (70 % singletons, Zipf clusters) drawn by :func:`benchmarks.scale.noisy` around the split's
real global vectors (its originals and distractors): a synthetic copy lies ``copy`` away from its
real base (the median distance between a copy and its original, measured on a sample of the split's copies), a singleton
``far`` away (the median distance between a real image and its nearest unrelated real image).
Each carries as many regional vectors as its base, drawn the same way around the base's real
regions. Their local features (for verification) are borrowed from another, unrelated real image
(nothing is stored for them): a synthetic candidate costs a real verification and is rejected
like a distractor. Found rate: the share of queried copies whose original is found, at each size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.longrun import rss_mb
from benchmarks.query import _percentiles, prepare_split
from benchmarks.run import DEFAULT_CACHE, SEED, bench_dir, generate, split_dir
from benchmarks.scale import bases, cpu, generate as generate_stream, noisy
from memetrace.models import ImageRow

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1000  # synthetic images per upsert: ~13 k region rows, well under gRPC's 64 MB message limit


class _Timed:
    """The vector index, its candidate searches timed (the part that grows with the corpus)."""

    def __init__(self, index: Any) -> None:
        self.index, self.seconds = index, []

    def candidates(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.index.candidates(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - t)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.index, name)


class _Borrowed:
    """The feature store, a synthetic image's keypoints and thumbnail those of a real one."""

    def __init__(self, features: Any, lender: dict[int, int]) -> None:
        self.features, self.lender = features, lender

    def get_keypoints(self, image_id: int) -> Any:
        return self.features.get_keypoints(self.lender.get(image_id, image_id))

    def get_thumbnail(self, image_id: int) -> Any:
        return self.features.get_thumbnail(self.lender.get(image_id, image_id))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.features, name)


def query_copies(ctx: Any, gt: Path, copies: list[dict], originals: dict[str, int], level: str) -> dict:
    """Each copy (never indexed) uploaded to CopyFinder, as ``POST /v1/search`` does."""
    return _timed(ctx, level, "upload", [(lambda f, r=r: f.find((gt.parent / r["path"]).read_bytes())[1],
                                          originals[r["group_id"]]) for r in copies])


def query_stored(ctx: Any, stored: dict[int, int], level: str) -> dict:
    """Each stored copy (image id -> its original's) searched by id, as ``GET /v1/images/{id}/copies``
    does: from its stored vectors and keypoints, nothing decoded, embedded or extracted."""
    return _timed(ctx, level, "stored", [(lambda f, i=i: f.find_stored(i)[1], original)
                                         for i, original in stored.items()])


def _timed(ctx: Any, level: str, kind: str, queries: list[tuple[Any, int]]) -> dict:
    """Each (search, expected original) timed one by one, the index's reads at consistency
    ``level`` ("Strong": the workers', "Bounded": the API's default, MEMETRACE_API_READ_CONSISTENCY)."""
    from dataclasses import replace

    from memetrace.matcher.query import CopyFinder

    milvus_index = _milvus_index(ctx)
    coded = milvus_index.config
    milvus_index.config = replace(coded, read_consistency=level)

    timed = _Timed(ctx.index)
    ctx.__dict__["index"] = timed  # cached_property: the finder's matcher reads it from here
    try:
        finder, seconds, found = CopyFinder(ctx), [], 0
        for search, original in queries:
            t = time.perf_counter()
            hits = search(finder)
            seconds.append(time.perf_counter() - t)
            found += original in {c.image_id for c in hits}
    finally:
        ctx.__dict__["index"] = timed.index
        milvus_index.config = coded
    return {"query": kind, "consistency": level, "queries": len(queries), "found": found,
            "found_rate": round(found / max(1, len(queries)), 4),
            "end_to_end": _percentiles(seconds), "candidates": _percentiles(timed.seconds)}


def distances(ctx: Any, gt: Path, copies: list[dict], originals: dict[str, int], glob: np.ndarray,
              ids: list[int]) -> tuple[float, float]:
    """(copy, far): median copy-to-original distance of a sample of copies, and median distance of a
    real image to its nearest real neighbour that is not itself."""
    from memetrace.imageio import DecodeLimits, decode

    row = {i: k for k, i in enumerate(ids)}
    limits = DecodeLimits.from_settings(ctx.settings)
    near = []
    for r in copies[:60]:
        if originals[r["group_id"]] in row:
            v, _ = ctx.embedder.embed([decode((gt.parent / r["path"]).read_bytes(), limits).rgb])
            near.append(float(np.linalg.norm(v[0] - glob[row[originals[r["group_id"]]]])))
    sims = glob @ glob.T
    np.fill_diagonal(sims, -np.inf)
    far = np.sqrt(np.maximum(0, 2 - 2 * sims.max(axis=1)))
    return float(np.median(near)), float(np.median(far))


def add_synthetic(ctx: Any, ids: list[int], glob: np.ndarray, regions: list[np.ndarray], n: int, start: int,
                  copy: float, far: float, lender: dict[int, int], seed: int) -> None:
    """Images ``start``..``n``-1 of a synthetic stream of ``n``, near the real ones (module docstring),
    stored as the ingest stores an image (``VectorIndex.upsert``), without their local features."""
    stream = generate_stream(n, seed)
    rng = np.random.default_rng(seed)
    base, distance = bases(stream, len(ids), copy, far, rng)
    records = ctx.index.get(ids)
    for lo in range(start, n, CHUNK):
        rows = []
        for k in range(lo, min(n, lo + CHUNK)):
            b, image_id = int(base[k]), int(stream.image_ids[k])
            lender[image_id] = ids[(b + 1 + int(rng.integers(0, len(ids) - 1))) % len(ids)]  # any real image but its base
            r = records[ids[b]]
            regs = noisy(regions[b], float(distance[k]), rng) if len(regions[b]) else regions[b]
            rows.append(ImageRow(image_id, "synthetic", r.width, r.height, r.nbytes, r.nb_points,
                                 noisy(glob[b][None], float(distance[k]), rng)[0], regs))
        ctx.index.upsert(rows)


def _milvus_index(ctx: Any) -> Any:
    """The MilvusVectorIndex under whatever wraps it (a ReducedVectorIndex keeps it as ``inner``)."""
    index = ctx.index
    while hasattr(index, "inner"):
        index = index.inner
    return index


def wait_indexed(ctx: Any, timeout: float = 1800) -> float:
    """Flush both collections and wait until Milvus has indexed every row: seconds waited."""
    t0, client = time.perf_counter(), ctx.milvus
    names = [_milvus_index(ctx).images, _milvus_index(ctx).regions]
    for name in names:
        client.flush(name)
    while time.perf_counter() - t0 < timeout:
        pending = sum(int(client.describe_index(name, "vector").get("pending_index_rows", 0)) for name in names)
        if not pending:
            break
        time.sleep(2)
    return round(time.perf_counter() - t0, 1)


def run(sizes: list[int], index_type: str, levels: list[str], limit: int, work: Path, seed: int,
        nlist: int = 128, nprobe: int = 16) -> dict:
    from benchmarks.services import MILVUS_STOP_GRACE, start_milvus_server, stop_process
    from memetrace.cli.batch import run_index
    from memetrace.cli.context import Context
    from memetrace.imageio import content_id
    from memetrace.settings import Settings

    gt, _ = generate(bench_dir(), split_dir(bench_dir(), "dev"), DEFAULT_CACHE.resolve() / "generated" / "dev", SEED)
    copies, originals, listing = prepare_split(gt, 2 * limit, work)
    # the first ``limit`` copies are uploaded; the next ``limit`` are indexed too and searched by id
    copies, kept = copies[:limit], copies[limit:]
    with listing.open("a", encoding="utf-8") as fh:
        fh.writelines(f"{(gt.parent / r['path']).resolve()}\n" for r in kept)
    stored = {content_id((gt.parent / r["path"]).read_bytes()): originals[r["group_id"]] for r in kept}
    milvus_dir = Path(tempfile.mkdtemp(prefix="memetrace-milvus-", dir=work))
    proc, uri = start_milvus_server(milvus_dir)
    out: dict[str, Any] = {"index_type": index_type, "nlist": nlist, "nprobe": nprobe, "rows": []}
    try:
        ctx = Context(Settings(_env_file=None, data_dir=work / "stores", milvus_uri=uri, milvus_index_type=index_type,
                               milvus_ivf_nlist=nlist, milvus_ivf_nprobe=nprobe,
                               cluster_state_path=None))
        t0 = time.perf_counter()
        run_index(ctx, listing, show_progress=False)
        out["real_index_s"] = round(time.perf_counter() - t0, 1)
        real = {content_id(Path(p).read_bytes()) for p in listing.read_text().splitlines()}
        # the synthetic images are drawn around the originals and distractors, not the copies searched by id
        ids, glob, regions = ctx.index.vectors(sorted(real - stored.keys()))
        out["real_images"], out["base_images"] = len(real), len(ids)
        out["base_regions"] = int(sum(len(r) for r in regions))
        copy, far = distances(ctx, gt, copies, originals, glob, ids)
        out["copy_distance"], out["far_distance"] = round(copy, 4), round(far, 4)
        lender: dict[int, int] = {}
        ctx.__dict__["features"] = _Borrowed(ctx.features, lender)
        have = 0
        for n in [len(real), *sizes]:
            t0 = time.perf_counter()
            if n > len(real):
                add_synthetic(ctx, ids, glob, regions, n - len(real), have, copy, far, lender, seed)
                have = n - len(real)
            insert_s = round(time.perf_counter() - t0, 1)
            waited = wait_indexed(ctx)
            for level in levels:
                for measured in (query_copies(ctx, gt, copies, originals, level), query_stored(ctx, stored, level)):
                    row = {"images": ctx.index.count(), "insert_s": insert_s, "index_wait_s": waited,
                           **measured, "milvus_rss_mb": rss_mb(proc.pid)}
                    out["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    (work.parent / "query-scale.partial.json").write_text(json.dumps(out, indent=2))  # kept if stopped
    finally:
        stop_process(proc, MILVUS_STOP_GRACE)
        shutil.rmtree(milvus_dir, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000],
                    help="images in the server (the split's real ones included)")
    ap.add_argument("--index", default="IVF_SQ8", choices=["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW"])
    ap.add_argument("--nlist", type=int, default=128, help="IVF lists (MEMETRACE_MILVUS_IVF_NLIST)")
    ap.add_argument("--nprobe", type=int, default=16, help="IVF lists searched (MEMETRACE_MILVUS_IVF_NPROBE)")
    ap.add_argument("--limit", type=int, default=100,
                    help="copies uploaded at each size; as many more are indexed and searched by id")
    ap.add_argument("--consistency", nargs="+", default=["Strong", "Bounded"],
                    help="read consistency of the index's reads: Strong (the workers'), Bounded (the API's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "query-scale")
    a = ap.parse_args(argv)
    from memetrace import logs

    logs.configure(0)
    result = run(a.sizes, a.index, a.consistency, a.limit, a.out / "query-work", a.seed, a.nlist, a.nprobe)
    result.update({"cpu": cpu(), "simulated": "the images beyond the split's (vectors near its real ones)",
                   "real": "Milvus 2.3 server, the split's images and queries, CopyFinder end to end"})
    (a.out / "query-scale.json").write_text(json.dumps(result, indent=2))
    for r in result["rows"]:
        print(f"{r['images']:>9,} images, {r['query']:>6}, {r['consistency']:>7}: found {r['found']}/{r['queries']}, end to end p50 "
              f"{r['end_to_end']['p50_ms']}"
              f" / p99 {r['end_to_end']['p99_ms']} ms, candidates p50 {r['candidates']['p50_ms']} / p99 "
              f"{r['candidates']['p99_ms']} ms, Milvus RSS {r['milvus_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
