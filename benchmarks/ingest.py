"""Streaming ingest throughput: posts through a real Kafka broker into Milvus, timed.

    .venv/bin/python -m benchmarks.ingest [--images DIR] [--count 300] [--out FILE]

(``python -m benchmarks.run`` runs it after the pipeline benchmark, on the same generated images,
unless ``--skip-ingest``.)

Everything on 127.0.0.1, started here and stopped at the end: a Tansu broker (memory storage), a
Milvus Lite server (data in a temp dir) and a ThreadingHTTPServer serving ``count`` of the images.
One post per image URL goes onto the posts topic, then one ``memetrace -v ingest --max-idle 5``
subprocess (plain MEMETRACE_* defaults, but for the loopback fetch, the temp data dir, the Milvus
URI and topic/group names) consumes them. From its JSON log lines: the first batch started at its
"batch stored" time minus its duration (= the first consume), the last "batch stored" is followed
at once by its offset commit, so consume -> commit is that span. posts/s = posts consumed / span;
images/s = occurrences stored (image downloaded, decoded, embedded, written) / span. The worker's
start-up (model load, Milvus connect, group join) and its 5 s idle exit are reported apart.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchmarks.services import start_milvus_lite, start_tansu, stop_process

MAX_IDLE_S = 5.0
DEFAULT_COUNT = 300
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
MEMETRACE = Path(sys.executable).with_name("memetrace")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def pick_images(images: Path, count: int) -> list[Path]:
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


def _run_worker(env: dict[str, str], cwd: Path, timeout: float) -> tuple[dict[str, Any], list[dict], float]:
    """``memetrace -v ingest --max-idle 5``: (its printed totals, its JSON log lines, its wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(MEMETRACE), "-v", "ingest", "--max-idle", str(MAX_IDLE_S)], cwd=cwd, env=env,
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
        raise RuntimeError(f"memetrace ingest did not finish within {timeout} s")
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    if proc.returncode != 0:
        last = [r.get("msg", "") + " " + str(r.get("error", ""))[:300] for r in lines[-5:]]
        raise RuntimeError(f"memetrace ingest exited {proc.returncode}: {last} {''.join(tail)[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), lines, wall


def run_ingest_bench(images: Path, count: int = DEFAULT_COUNT, timeout: float = 540) -> dict[str, Any]:
    """Produce one post per image (``count`` of those in ``images``), ingest them, time it."""
    from benchmarks.run import machine_info

    files = pick_images(images, count)
    work = Path(tempfile.mkdtemp(prefix="memetrace-ingest-bench-"))
    procs: list[subprocess.Popen] = []
    http = None
    try:
        broker, bootstrap = start_tansu()
        procs.append(broker)
        milvus, milvus_uri = start_milvus_lite(work / "milvus")
        procs.append(milvus)
        http, base = _serve(images)
        tag = uuid.uuid4().hex[:8]
        posts_topic = f"bench-posts-{tag}"
        posts = [{"post_id": f"bench-{i}", "url": f"{base}/{f.name}"} for i, f in enumerate(files)]
        produce_s = _produce(bootstrap, posts_topic, posts)

        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEMETRACE_")}
        env.update({"MEMETRACE_DATA_DIR": str(work / "data"), "MEMETRACE_MILVUS_URI": milvus_uri,
                    "MEMETRACE_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "MEMETRACE_KAFKA_POSTS_TOPIC": posts_topic,
                    "MEMETRACE_KAFKA_IMAGES_TOPIC": f"bench-images-{tag}",
                    "MEMETRACE_KAFKA_DEADLETTER_TOPIC": f"bench-dead-{tag}",
                    "MEMETRACE_KAFKA_GROUP_ID": f"bench-{tag}", "MEMETRACE_FETCH_ALLOW_PRIVATE_NETWORKS": "1",
                    "MEMETRACE_METRICS_PORT": "0"})
        load_before = os.getloadavg()
        launched = time.time()
        totals, lines, wall = _run_worker(env, work, timeout)  # cwd = work: no .env file leaks in
        load_after = os.getloadavg()
        stored = _milvus_counts(milvus_uri, work / "check")
    finally:
        if http is not None:
            http.shutdown()
        for p in procs:
            stop_process(p)
        shutil.rmtree(work, ignore_errors=True)

    batches = [r for r in lines if r.get("msg") == "batch stored"]
    if not batches:
        raise RuntimeError(f"the worker stored no batch: {totals}")
    if len(batches) != totals["batches"]:
        raise RuntimeError(f"{len(batches)} 'batch stored' log lines for {totals['batches']} batches: cannot time")
    first_consume = batches[0]["time"] - float(batches[0]["seconds"])
    last_commit = batches[-1]["time"]
    span = max(last_commit - first_consume, 1e-3)
    device = next((r.get("device") for r in lines if r.get("device")), None)
    return {
        "posts_produced": len(posts), "produce_s": round(produce_s, 2), "totals": totals,
        "consume_to_commit_s": round(span, 2),
        "posts_per_s": round(totals["posts"] / span, 2),
        "images_per_s": round(totals["occurrences"] / span, 2),
        "new_images_per_s": round(totals["new_images"] / span, 2),
        "milvus_after": stored, "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "worker_wall_s": round(wall, 2), "worker_startup_s": round(first_consume - launched, 2),
        "max_idle_s": MAX_IDLE_S, "batch_size": _batch_size(), "torch_device": device,
        "machine": machine_info(device),
        "how": "posts through a Tansu broker on 127.0.0.1 -> one `memetrace ingest` subprocess (defaults) -> "
               "Milvus Lite server on 127.0.0.1; images served by a local HTTP server; span = first consume to "
               "last commit, from the worker's JSON logs",
    }


def _milvus_counts(uri: str, data_dir: Path) -> dict[str, int]:
    """What the worker left in Milvus: the figures are only worth something if everything is there."""
    from memetrace.milvus_store import MilvusStore, connect, stored_dim
    from memetrace.settings import Settings

    s = Settings(_env_file=None, data_dir=data_dir, milvus_uri=uri)
    client = connect(s)
    try:
        store = MilvusStore(s, stored_dim(client, s) or 1, client)
        return {"images": store.count(), "occurrences": store.count_occurrences()}
    finally:
        client.close()


def _batch_size() -> int:
    from memetrace.settings import Settings

    return int(Settings.model_fields["ingest_batch_size"].default)


def format_ingest(r: dict[str, Any]) -> str:
    t = r["totals"]
    m = r["machine"]
    dead = sum(t["deadlettered"].values())
    return "\n".join([
        f"streaming ingest (Kafka -> memetrace ingest -> Milvus, all on 127.0.0.1): {r['posts_produced']} posts, "
        f"batch size {r['batch_size']}",
        f"  machine: {m['cpu_model']}, {m['usable_cpus']}/{m['cpu_count']} CPUs, torch on {r['torch_device'] or '?'}",
        f"  ingest posts/s:  {r['posts_per_s']:.1f}   ({t['posts']} posts consumed in {r['consume_to_commit_s']} s, "
        f"first consume -> last commit)",
        f"  ingest images/s: {r['images_per_s']:.1f}   ({t['occurrences']} images stored, {t['new_images']} distinct; "
        f"{dead} dead-lettered{' ' + str(t['deadlettered']) if dead else ''})",
        f"  in Milvus afterwards: {r['milvus_after']['images']} images, {r['milvus_after']['occurrences']} "
        f"occurrences; load average {r['loadavg_before'][0]} -> {r['loadavg_after'][0]}",
        f"  worker wall {r['worker_wall_s']} s = start-up {r['worker_startup_s']} s + consume->commit "
        f"{r['consume_to_commit_s']} s + {r['max_idle_s']:.0f} s idle exit; produce {r['produce_s']} s",
    ])


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import DEFAULT_CACHE

    ap = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_CACHE / "generated" / "dev" / "images",
                    help="folder of images to post (default: the generated dev split of `make bench`)")
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"posts, one per image (default {DEFAULT_COUNT})")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    a = ap.parse_args(argv)
    from memetrace import logs

    logs.configure(0)
    result = run_ingest_bench(a.images.resolve(), a.count)
    print(format_ingest(result))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
