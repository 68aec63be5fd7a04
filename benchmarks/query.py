"""The query benchmark (part of ``make bench``): is the original found for a copy nobody indexed?

    .venv/bin/python -m benchmarks.query [--seed N] [--http-sample 30] [--out DIR] [--limit N]

1. Generates (or reuses) the split as :mod:`benchmarks.run` does; ``--seed`` other than the
   benchmark's default makes a split of other edits and layouts (cached apart).
2. Indexes its originals and distractors only, on a fresh data dir (Milvus Lite).
3. Queries every copy through :class:`memetrace.matcher.query.CopyFinder`, the code behind
   ``POST /v1/search``; then a sample of them through HTTP (a real uvicorn on 127.0.0.1), whose
   answers must agree with the in-process ones.
4. Reports, per family (the last edit of the copy's transform chain) and overall: the share of
   copies whose original is found, mAP (one relevant image per query: 1 / rank of the original),
   µAP (every answer of every query pooled and ranked by inliers, the ISC's micro AP), the queries
   answered with another image first ("wrong first"), and p50 / p99 latency.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run import DEFAULT_CACHE, DEFAULT_OUT, SEED, BenchError, _table, bench_dir, generate, split_dir

HTTP_SAMPLE = 30


def _truth(gt: Path) -> list[dict[str, str]]:
    with gt.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def prepare_split(gt: Path, limit: int | None, work: Path) -> tuple[list[dict[str, str]], dict[str, int], Path]:
    """(copies, group -> original's image id, listing of the images to index) of ``gt``, in a
    fresh ``work`` folder; ``limit``: the first copies only (all when None)."""
    import shutil

    from memetrace.imageio import content_id

    rows = _truth(gt)
    stored = [r for r in rows if r["role"] in ("original", "distractor")]
    copies = [r for r in rows if r["role"] == "copy"][:limit]
    originals = {r["group_id"]: content_id((gt.parent / r["path"]).read_bytes()) for r in stored
                 if r["role"] == "original"}
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    listing = work / "stored.txt"
    listing.write_text("".join(f"{(gt.parent / r['path']).resolve()}\n" for r in stored))
    return copies, originals, listing


def family(transform: str) -> str:
    """A copy's family: the last edit of its chain (``crop>text>collage``: collage)."""
    return transform.split(">")[-1]


def micro_ap(answers: list[tuple[float, bool]], positives: int) -> float:
    """Average precision of every (score, is the original) answer pooled, best score first."""
    if not positives:
        return 0.0
    hits = np.array([ok for _, ok in sorted(answers, key=lambda a: -a[0])], bool)
    if not hits.any():
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / positives)


def _percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None}
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def _score(queries: list[dict[str, Any]]) -> dict[str, Any]:
    """Hit rate, mAP, µAP and wrong-first count of ``queries`` (each: rank of the original, answers)."""
    n = len(queries)
    found = sum(q["rank"] is not None for q in queries)
    answers = [a for q in queries for a in q["answers"]]
    return {"queries": n, "found": found, "hit_rate": round(found / n, 4) if n else None,
            "mAP": round(sum(1 / q["rank"] for q in queries if q["rank"]) / n, 4) if n else None,
            "uAP": round(micro_ap(answers, n), 4),
            "wrong_first": sum(q["wrong_first"] for q in queries)}


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _http_search(base: str, data: bytes) -> list[int]:
    body, content_type = _multipart(data)
    req = urllib.request.Request(f"{base}/v1/search", data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return [m["image_id"] for m in json.loads(resp.read())["matches"]]


def _serve(ctx: Any) -> tuple[Any, threading.Thread, str]:
    from memetrace.api.app import create_app
    from memetrace.api.server import bind, server_for

    sock = bind("127.0.0.1", 0)
    server = server_for(create_app(ctx))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=10) as resp:
                if resp.status == 200:
                    return server, thread, base
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"the API on {base} did not become ready in 120 s")
        time.sleep(0.2)


def run_query_bench(gt: Path, data_dir: Path, http_sample: int = HTTP_SAMPLE, limit: int | None = None
                    ) -> dict[str, Any]:
    """Index ``gt``'s originals and distractors into a fresh ``data_dir``, query its copies (the first
    ``limit``: all when None) in process and ``http_sample`` of them through HTTP."""
    from memetrace.cli.batch import run_index
    from memetrace.cli.context import Context
    from memetrace.matcher.query import CopyFinder
    from memetrace.settings import Settings

    copies, originals, listing = prepare_split(gt, limit, data_dir)
    ctx = Context(Settings(data_dir=data_dir / "stores", milvus_uri="", cluster_state_path=None))
    t0 = time.perf_counter()
    run_index(ctx, listing, show_progress=False)
    index_s = round(time.perf_counter() - t0, 2)

    finder = CopyFinder(ctx)
    queries, seconds = [], []
    for r in copies:
        data = (gt.parent / r["path"]).read_bytes()
        t = time.perf_counter()
        _, found = finder.find(data)
        seconds.append(time.perf_counter() - t)
        want = originals[r["group_id"]]
        ids = [c.image_id for c in found]
        queries.append({"path": r["path"], "family": family(r["transform"]), "transform": r["transform"],
                        "rank": ids.index(want) + 1 if want in ids else None,
                        "wrong_first": bool(ids) and ids[0] != want, "ids": ids,
                        "answers": [(c.inliers, c.image_id == want) for c in found]})

    step = max(1, len(copies) // http_sample) if http_sample else 0
    sample = list(range(0, len(copies), step))[:http_sample] if step else []
    http_seconds: list[float] = []
    disagree: list[str] = []
    http_error = None
    try:  # the in-process figures stand on their own: an API that fails to start is reported, not fatal
        if sample:
            server, thread, base = _serve(ctx)
            try:
                for i in sample:
                    t = time.perf_counter()
                    ids = _http_search(base, (gt.parent / copies[i]["path"]).read_bytes())
                    http_seconds.append(time.perf_counter() - t)
                    if ids != queries[i]["ids"]:
                        disagree.append(copies[i]["path"])
            finally:
                server.should_exit = True
                thread.join(30)
    except Exception as exc:  # noqa: BLE001 - whatever broke, the report says it
        http_error = f"{type(exc).__name__}: {exc}"
    ctx.milvus.close()
    ctx.catalog.close()
    ctx.graph_state.close()

    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for q in queries:
        by_family[q["family"]].append(q)
    return {
        "indexed": len(listing.read_text().splitlines()), "index_s": index_s,
        "overall": {**_score(queries), **_percentiles(seconds)},
        "families": {f: _score(qs) for f, qs in sorted(by_family.items(), key=lambda kv: kv[0])},
        "http": {"queries": len(http_seconds), **_percentiles(http_seconds), "disagree_with_in_process": disagree,
                 "error": http_error},
        "missed": [q["transform"] + " " + q["path"] for q in queries if q["rank"] is None],
        "wrong_first": [q["transform"] + " " + q["path"] for q in queries if q["wrong_first"]],
    }


def format_query(r: dict[str, Any]) -> str:
    o, h = r["overall"], r["http"]
    fam = [[f, f"{s['found']} / {s['queries']}", f"{s['hit_rate']:.3f}", f"{s['mAP']:.3f}", str(s["wrong_first"])]
           for f, s in sorted(r["families"].items(), key=lambda kv: (kv[1]["hit_rate"], kv[0]))]
    return "\n".join([
        f"query benchmark: {r['indexed']} originals and distractors indexed ({r['index_s']} s), "
        f"{o['queries']} copies queried (never indexed)",
        _table(["family (last edit)", "found", "hit rate", "mAP", "wrong first"], fam, left=("family (last edit)",)),
        f"all: hit rate {o['hit_rate']:.4f}, mAP {o['mAP']:.4f}, µAP {o['uAP']:.4f}, wrong first {o['wrong_first']}, "
        f"in process p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms",
        f"HTTP (POST /v1/search, {h['queries']} copies): p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, "
        f"{len(h['disagree_with_in_process'])} answers differ from the in-process ones"
        + (f"; FAILED: {h['error']}" if h.get("error") else ""),
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.query", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev", help="dev (the benchmark folder) or a split folder (default dev)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"make_bench.py's seed (default {SEED})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT / "query", help="results folder")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where generated splits are kept")
    ap.add_argument("--http-sample", type=int, default=HTTP_SAMPLE, help="copies also queried through HTTP")
    ap.add_argument("--limit", type=int, default=None, help="query only the first N copies (a quick look)")
    a = ap.parse_args(argv)
    from memetrace import logs

    logs.configure(0)
    try:
        bench = bench_dir()
        src = split_dir(bench, a.split)
        name = (a.split if a.split == "dev" else src.name) + ("" if a.seed == SEED else f"-seed{a.seed}")
        gt, _ = generate(bench, src, a.cache.resolve() / "generated" / name, a.seed)
        out = a.out.resolve()
        result = {"split": name, "seed": a.seed, **run_query_bench(gt, out / "data", a.http_sample, a.limit)}
    except BenchError as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"split {name} (seed {a.seed})\n" + format_query(result))
    print(f"\nresults: {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
