"""Streaming benchmark: posts through a real Kafka broker into Milvus, matched and clustered, timed and scored.

    .venv/bin/python -m benchmarks.ingest [--images DIR] [--count N] [--out FILE] [--clusters-csv FILE]

(``python -m benchmarks.run`` runs it after the pipeline benchmark, on the same generated images,
unless ``--skip-ingest``.)

Everything on 127.0.0.1, started here and stopped at the end: a Tansu broker (memory storage), a
Milvus Lite server (data in a temp dir) and a ThreadingHTTPServer serving ``count`` of the images
(default: all of them). One post per image URL goes onto the posts topic, then three subprocesses run
one after the other on the same broker, Milvus and data dir (plain MEMETRACE_* defaults, but for the
loopback fetch, the temp data dir, the Milvus URI and per-run topic/group names), each exiting after
10 s without a message: ``memetrace -v ingest``, ``memetrace -v match``, ``memetrace -v cluster --every 1``.
From each one's JSON log lines: its first batch started at its "batch stored" time minus its duration
(= the first consume), the last "batch stored" is followed at once by its offset commit, so
consume -> commit is that span; start-up (imports, model load, Milvus connect, group join) is launch
-> first consume. Ingest: posts/s = posts consumed / span; images/s = occurrences stored (downloaded,
decoded, embedded, written) / span. Match: image ids verified / span (every image is already stored
when the matcher starts, so this is matching throughput, not a race with the ingest). Cluster: its
span covers storing the events in SQLite and the periodic reclusterings in between; each reclustering
is timed on its own ("reclustered" log lines). The clusterer's state then gives the streaming
clusters, written as the pipeline's clusters CSV (image ids mapped back to file names through
``content_id`` of the served bytes) and scored with the benchmark's score.py when the ground truth is
known: against the whole split, or against its rows for the ingested files when only some were posted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.services import serve_folder, start_milvus_lite, start_tansu, stop_process

# each service exits after this long without a message (counted from joining its consumer group)
MAX_IDLE_S = 10.0
RECLUSTER_EVERY_S = 1.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
MEMETRACE = Path(sys.executable).with_name("memetrace")


def pick_images(images: Path, count: int | None = None) -> list[Path]:
    """The first ``count`` images by file name (None: all)."""
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {images}")
    return files[:count]


def _produce(bootstrap: str, topic: str, posts: list[dict[str, str]]) -> float:
    """Send the posts (acks=all, like ``memetrace produce``); returns the seconds it took."""
    from memetrace.kafka_clients import ensure_topics, make_producer
    from memetrace.settings import Settings

    s = Settings(_env_file=None, kafka_bootstrap_servers=bootstrap, kafka_posts_topic=topic)
    t0 = time.perf_counter()
    ensure_topics(s, [topic])
    producer = make_producer(s)
    try:
        futures = [producer.send(topic, key=p["post_id"].encode(), value=json.dumps(p).encode()) for p in posts]
        producer.flush()
        for fut in futures:
            fut.get(timeout=30)
    finally:
        producer.close()
    return time.perf_counter() - t0


def _children_cpu_s() -> float:
    """User + system CPU seconds of the waited-for child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_worker(verb: list[str], env: dict[str, str], cwd: Path,
                timeout: float) -> tuple[dict[str, Any], list[dict], dict[str, Any]]:
    """``memetrace -v VERB... --max-idle MAX_IDLE_S``: (its printed totals, its JSON log lines, its timing)."""
    service = verb[0]  # the StreamWorker's name in its "batch stored" lines
    load_before = os.getloadavg()
    cpu_before = _children_cpu_s()
    launched = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(MEMETRACE), "-v", *verb, "--max-idle", str(MAX_IDLE_S)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    tail: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            try:
                lines.append(json.loads(line))
            except ValueError:
                tail.append(line)
                del tail[:-20]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)  # stdout holds one JSON line: no pipe fills up meanwhile
        out = proc.stdout.read()  # not communicate(): it would race the reader for stderr lines
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"memetrace {service} did not finish within {timeout} s")
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu_before  # the worker's whole process tree: a figure the load moves less
    reader.join(timeout=5)
    if proc.returncode != 0:
        last = [r.get("msg", "") + " " + str(r.get("error", ""))[:300] for r in lines[-5:]]
        raise RuntimeError(f"memetrace {service} exited {proc.returncode}: {last} {''.join(tail)[-2000:]}")
    totals = json.loads(out.strip().splitlines()[-1])
    batches = [r for r in lines if r.get("msg") == "batch stored" and r.get("service") == service]
    if not batches:
        seen = [f"+{r['time'] - launched:.1f}s {r.get('msg')}" for r in lines
                if "time" in r and not r.get("logger", "").startswith("kafka")]  # kafka-python's debug lines: noise
        raise RuntimeError(f"memetrace {service} stored no batch: {totals}; its log: {seen[-10:]}")
    first_consume = batches[0]["time"] - float(batches[0]["seconds"])
    span = max(batches[-1]["time"] - first_consume, 1e-3)
    timing = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "startup_s": round(first_consume - launched, 2),
              "consume_to_commit_s": round(span, 2), "batches": len(batches),
              "records": sum(int(r["records"]) for r in batches),
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    return totals, lines, timing


def run_ingest_bench(images: Path, count: int | None = None, clusters_csv: Path | None = None,
                     ground_truth: Path | None = None, timeout: float = 540) -> dict[str, Any]:
    """Produce one post per image (``count`` of those in ``images``, None: all), ingest, match and
    cluster them, time each service; write the streaming clusters to ``clusters_csv`` and score them
    against ``ground_truth`` when given."""
    from benchmarks.run import machine_info

    files = pick_images(images, count)
    work = Path(tempfile.mkdtemp(prefix="memetrace-ingest-bench-"))
    clusters_csv = clusters_csv or work / "stream_clusters.csv"
    procs: list[subprocess.Popen] = []
    http = None
    try:
        broker, bootstrap = start_tansu()
        procs.append(broker)
        milvus, milvus_uri = start_milvus_lite(work / "milvus")
        procs.append(milvus)
        http, base = serve_folder(images)
        tag = uuid.uuid4().hex[:8]
        posts_topic = f"bench-posts-{tag}"
        posts = [{"post_id": f"bench-{i}", "url": f"{base}/{f.name}"} for i, f in enumerate(files)]
        produce_s = _produce(bootstrap, posts_topic, posts)

        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEMETRACE_")}
        env.update({"MEMETRACE_DATA_DIR": str(work / "data"), "MEMETRACE_MILVUS_URI": milvus_uri,
                    "MEMETRACE_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "MEMETRACE_KAFKA_POSTS_TOPIC": posts_topic,
                    "MEMETRACE_KAFKA_IMAGES_TOPIC": f"bench-images-{tag}",
                    "MEMETRACE_KAFKA_MATCHES_TOPIC": f"bench-matches-{tag}",
                    "MEMETRACE_KAFKA_DEADLETTER_TOPIC": f"bench-dead-{tag}",
                    "MEMETRACE_KAFKA_INGEST_GROUP_ID": f"bench-{tag}",
                    "MEMETRACE_KAFKA_MATCH_GROUP_ID": f"bench-match-{tag}",
                    "MEMETRACE_KAFKA_CLUSTER_GROUP_ID": f"bench-cluster-{tag}",
                    "MEMETRACE_FETCH_ALLOW_PRIVATE_NETWORKS": "1", "MEMETRACE_METRICS_PORT": "0"})
        # cwd = work: no .env file leaks in
        totals, lines, timing = _run_worker(["ingest"], env, work, timeout)
        stored = _milvus_counts(milvus_uri, work / "check")
        match_totals, match_lines, match_timing = _run_worker(["match"], env, work, timeout)
        cluster_totals, cluster_lines, cluster_timing = _run_worker(
            ["cluster", "--every", str(RECLUSTER_EVERY_S)], env, work, timeout)
        exported = _export_clusters(work / "data" / "cluster-state.db", files, clusters_csv)
    finally:
        if http is not None:
            http.shutdown()
        for p in procs:
            stop_process(p)
        shutil.rmtree(work, ignore_errors=True)

    if timing["batches"] != totals["batches"]:
        raise RuntimeError(f"{timing['batches']} 'batch stored' log lines for {totals['batches']} batches: "
                           "cannot time")
    span = timing["consume_to_commit_s"]
    device = next((r.get("device") for r in lines if r.get("device")), None)
    result = {
        "posts_produced": len(posts), "produce_s": round(produce_s, 2), "totals": totals,
        "consume_to_commit_s": span,
        "posts_per_s": round(totals["posts"] / span, 2),
        "images_per_s": round(totals["occurrences"] / span, 2),
        "new_images_per_s": round(totals["new_images"] / span, 2),
        "milvus_after": stored, "loadavg_before": timing["loadavg_before"], "loadavg_after": timing["loadavg_after"],
        "worker_wall_s": timing["wall_s"], "worker_startup_s": timing["startup_s"], "worker_cpu_s": timing["cpu_s"],
        "max_idle_s": MAX_IDLE_S, "batch_size": _setting_default("ingest_batch_size"), "torch_device": device,
        "match": _match_figures(match_totals, match_lines, match_timing),
        "cluster": _cluster_figures(cluster_totals, cluster_lines, cluster_timing),
        "stream_clusters": exported,
        "machine": machine_info(device),
        "how": "posts through a Tansu broker on 127.0.0.1 -> `memetrace ingest` -> Milvus Lite server on "
               "127.0.0.1, then `memetrace match`, then `memetrace cluster --every 1` (subprocesses with default "
               f"settings, one after the other, each exiting after {MAX_IDLE_S:.0f} s idle); images served by a local HTTP "
               "server; span = first consume to last commit, from each service's JSON logs",
    }
    if ground_truth is not None:
        result["stream_quality"] = _score(ground_truth, files, clusters_csv)
    return result


def _match_figures(totals: dict[str, Any], lines: list[dict], timing: dict[str, Any]) -> dict[str, Any]:
    matched = [r for r in lines if r.get("msg") == "images matched"]
    return {**timing, "images_matched": totals["images_matched"], "edges_published": totals["edges_published"],
            "images_matched_per_s": round(totals["images_matched"] / timing["consume_to_commit_s"], 2),
            # time inside Matcher.match_stored (candidates + verification), from the per-batch log lines
            "verify_s": round(sum(r["images"] * r["seconds_per_image"] for r in matched), 2),
            "batch_size": _setting_default("match_batch_size"), "stopped_by": totals["stopped_by"]}


def _cluster_figures(totals: dict[str, Any], lines: list[dict], timing: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in lines if r.get("msg") == "reclustered"]
    if not runs:
        raise RuntimeError(f"memetrace cluster never reclustered: {totals}")
    return {**timing, "reclusterings": len(runs), "every_s": RECLUSTER_EVERY_S,
            "recluster_s_total": round(sum(float(r["seconds"]) for r in runs), 3),
            "recluster_s_max": max(float(r["seconds"]) for r in runs),
            "recluster_s_last": float(runs[-1]["seconds"]),
            "clusters": totals["clusters"], "images_clustered": totals["images_clustered"],
            "largest": runs[-1]["largest"], "stopped_by": totals["stopped_by"]}


def _export_clusters(state_path: Path, files: list[Path], out: Path) -> dict[str, Any]:
    """The clusterer's state as the pipeline's clusters CSV, one row per served file (exact
    duplicates share an image id, hence a cluster)."""
    from memetrace.clusterer.export import cluster_rows, write_csv
    from memetrace.clusterer.graph import build_graph
    from memetrace.clusterer.state import SqliteGraphState
    from memetrace.imageio import content_id

    names: dict[int, list[str]] = {}
    for f in files:
        names.setdefault(content_id(f.read_bytes()), []).append(f.name)
    state = SqliteGraphState(state_path)
    try:
        nb_points = state.images()
        assignment = state.clusters()
        edges = state.matches()
        rows = cluster_rows(build_graph(nb_points, edges), assignment, names, nb_points)
    finally:
        state.close()
    write_csv(rows, out)
    return {"csv": str(out), "rows": len(rows), "files": len(files), "distinct_ids": len(names),
            "edges_stored": len(edges),  # distinct pairs: both sides of a pair may publish it
            "files_not_clustered": sum(len(v) for k, v in names.items() if k not in assignment),
            "clustered_ids_not_served": sum(1 for k in assignment if k not in names)}


def _score(ground_truth: Path, files: list[Path], clusters_csv: Path) -> dict[str, Any]:
    """score.py on the streaming clusters (the call that scores the pipeline), against the ground
    truth rows of the ingested files: a subset's groups are cut, and missing files are not misses."""
    from benchmarks.run import bench_dir, cross_check, score

    with ground_truth.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or [], list(reader)
    served = {f.name for f in files}
    kept = [r for r in rows if Path(r["path"]).name in served]
    gt = ground_truth
    if len(kept) < len(rows):
        gt = clusters_csv.with_name("stream_ground_truth.csv")
        with gt.open("w", newline="") as fh:  # the CSV names bare files: they resolve from any folder
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(kept)
    s = score(bench_dir(), gt, clusters_csv)
    return {"ground_truth": str(gt), "scored_against": "whole split" if gt == ground_truth
            else f"{len(kept)} of {len(rows)} ground-truth images (the ingested ones)",
            "score": s, "evaluate_cross_check": cross_check(s, gt, clusters_csv)}


def _milvus_counts(uri: str, data_dir: Path) -> dict[str, int]:
    """What the worker left in Milvus: the figures are only worth something if everything is there."""
    from memetrace.cli.context import Context
    from memetrace.settings import Settings

    c = Context(Settings(_env_file=None, data_dir=data_dir, milvus_uri=uri))
    try:
        return {"images": c.index.count(), "occurrences": c.occurrences.count_occurrences()}
    finally:
        c.milvus.close()


def _setting_default(name: str) -> int:
    from memetrace.settings import Settings

    return int(Settings.model_fields[name].default)


def _wall(wall: float, startup: float, span: float) -> str:
    # the rest is the max-idle wait plus the exit (last commit, clients closed, interpreter teardown)
    return (f"wall {wall} s = start-up {startup} s + consume->commit {span} s + {round(wall - startup - span, 2)} s "
            f"idle exit ({MAX_IDLE_S:.0f} s) and shutdown")


def format_ingest(r: dict[str, Any]) -> str:
    t, mt, cl = r["totals"], r["match"], r["cluster"]
    m = r["machine"]
    dead = sum(t["deadlettered"].values())
    parts = [
        f"streaming (Kafka -> memetrace ingest -> Milvus, then match, then cluster; all on 127.0.0.1): "
        f"{r['posts_produced']} posts",
        f"  machine: {m['cpu_model']}, {m['usable_cpus']}/{m['cpu_count']} CPUs, torch on {r['torch_device'] or '?'}",
        f"  ingest posts/s:  {r['posts_per_s']:.1f}   ({t['posts']} posts consumed in {r['consume_to_commit_s']} s, "
        f"first consume -> last commit, batch size {r['batch_size']})",
        f"  ingest images/s: {r['images_per_s']:.1f}   ({t['occurrences']} images stored, {t['new_images']} distinct; "
        f"{dead} dead-lettered{' ' + str(t['deadlettered']) if dead else ''})",
        f"  in Milvus afterwards: {r['milvus_after']['images']} images, {r['milvus_after']['occurrences']} "
        f"occurrences; load average {r['loadavg_before'][0]} -> {r['loadavg_after'][0]}",
        f"  ingest {_wall(r['worker_wall_s'], r['worker_startup_s'], r['consume_to_commit_s'])}; "
        f"produce {r['produce_s']} s; CPU {r['worker_cpu_s']} s ({1000 * r['worker_cpu_s'] / max(t['posts'], 1):.0f} ms a post, "
        "start-up included)",
        f"  match images/s:  {mt['images_matched_per_s']:.1f}   ({mt['images_matched']} images matched, "
        f"{mt['edges_published']} edges published in {mt['consume_to_commit_s']} s consume->commit, "
        f"{mt['verify_s']} s of it verifying; batch size {mt['batch_size']})",
        f"  match {_wall(mt['wall_s'], mt['startup_s'], mt['consume_to_commit_s'])}; load average "
        f"{mt['loadavg_before'][0]} -> {mt['loadavg_after'][0]}; CPU {mt['cpu_s']} s",
        f"  cluster: {cl['clusters']} clusters of 2+ images ({cl['images_clustered']} images, largest "
        f"{cl['largest']}; {r['stream_clusters']['edges_stored']} distinct edges); {cl['reclusterings']} reclusterings (every {cl['every_s']:.0f} s) took "
        f"{cl['recluster_s_total']} s, the last {cl['recluster_s_last']} s",
        f"  cluster {_wall(cl['wall_s'], cl['startup_s'], cl['consume_to_commit_s'])}; {cl['records']} events "
        f"in {cl['batches']} batches",
    ]
    q = r.get("stream_quality")
    if q:
        s = q["score"]
        parts.append(f"  streaming clusters (score.py, {q['scored_against']}): cluster F1 {s['cluster_f1']:.4f}, "
                     f"P {s['cluster_precision']:.4f}, R {s['cluster_recall']:.4f}; query AP "
                     f"{s['query_average_precision']:.4f}; {r['stream_clusters']['files_not_clustered']} files "
                     f"not in the clusterer state")
        if not q["evaluate_cross_check"]["agrees"]:
            parts.append(f"  WARNING: clusterer.evaluate disagrees with score.py: "
                         f"{q['evaluate_cross_check']['mismatches']}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import DEFAULT_CACHE, DEFAULT_OUT

    ap = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_CACHE / "generated" / "dev" / "images",
                    help="folder of images to post (default: the generated dev split of `make bench`)")
    ap.add_argument("--count", type=int, default=None, help="posts, one per image (default: every image)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--clusters-csv", type=Path, default=DEFAULT_OUT / "stream_clusters.csv",
                    help="the streaming clusters CSV (default %(default)s)")
    a = ap.parse_args(argv)
    from memetrace import logs

    logs.configure(0)
    images = a.images.resolve()
    gt = images.parent / "ground_truth.csv"  # beside the images in a generated split: then scored
    result = run_ingest_bench(images, a.count, a.clusters_csv.resolve(), gt if gt.is_file() else None)
    print(format_ingest(result))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
