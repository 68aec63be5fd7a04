"""Long-run stability (issue 12 item 5): posts through ingest, match and cluster on the local stack
for ``--minutes``, each service's resident memory and the throughput sampled every ``--every`` s.

    nice -n 19 .venv/bin/python -m benchmarks.longrun [--minutes 25] [--every 60] [--out DIR]

What runs, all real and on 127.0.0.1 (as ``make stack`` starts it, tools/local_stack.py): a Tansu
broker, a milvus-lite server, and the ``memetrace ingest``, ``match`` and ``cluster`` services
(their own processes, default settings). What is simulated: the posts. Each one points at a file
of the dev split (.bench/generated/dev/images) served over loopback HTTP; pass ``k`` of the split
serves every file cropped by ``k`` pixels on each side and re-encoded, so every post is a new
image (new bytes: downloaded, decoded, embedded, SIFTed, matched, clustered), a near copy of the
split's same file in earlier passes. Posts are produced in small lots whenever the ingest's backlog
falls under ``--backlog``, so the services always have work and the throughput is what they can do.

Per window: posts the ingest consumed, images it stored, images the matcher matched, edges the
clusterer consumed (from each service's Prometheus /metrics), and the RSS of each service's process
tree (/proc, VmRSS summed over its children). The first ``--warmup`` windows are the warm-up: memory
growth is reported after it (the issue: < 10 % after warm-up, throughput flat).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.scale import cpu
from benchmarks.services import free_port, start_milvus_lite, start_tansu, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SPLIT = ROOT / ".bench" / "generated" / "dev" / "images"
MEMETRACE = str(Path(sys.executable).with_name("memetrace"))
SERVICES = {"ingest": ["ingest"], "match": ["match"], "cluster": ["cluster", "--every", "10"]}
COUNTERS = {"posts_consumed": ("ingest", "memetrace_posts_consumed_total"),
            "images_stored": ("ingest", "memetrace_images_stored_total"),
            "images_matched": ("match", "memetrace_images_matched_total"),
            "edges_clustered": ("cluster", "memetrace_cluster_edges_consumed_total")}
PLATFORMS = ("mastodon", "bluesky", "reddit", "x")


class _Variants(BaseHTTPRequestHandler):
    """GET /<k>/<file>: the split's file cropped by k pixels on each side, as JPEG (k = 0: as is)."""

    def do_GET(self) -> None:
        from PIL import Image

        _, k, name = self.path.split("/", 2)
        path = SPLIT / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if int(k):
            with Image.open(io.BytesIO(data)) as im:
                c = min(int(k), min(im.size) // 4)
                buf = io.BytesIO()
                im.convert("RGB").crop((c, c, im.width - c, im.height - c)).save(buf, "JPEG", quality=90)
                data = buf.getvalue()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` and all its descendants, MB (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return round(total / 1024, 1)


def scrape(port: int) -> dict[str, float]:
    """A /metrics page's unlabelled samples (labelled ones summed per name)."""
    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


class Producer:
    """Posts to the posts topic, pass by pass over the split's files."""

    def __init__(self, bootstrap: str, topic: str, base: str) -> None:
        from kafka import KafkaProducer

        self.files = sorted(p.name for p in SPLIT.iterdir())
        self.base, self.topic, self.sent = base, topic, 0
        self.kafka = KafkaProducer(bootstrap_servers=bootstrap)

    def send(self, n: int) -> None:
        for _ in range(n):
            k, name = divmod(self.sent, len(self.files))
            post = {"post_id": f"longrun/{self.sent}", "url": f"{self.base}/{k}/{self.files[name]}",
                    "platform": PLATFORMS[self.sent % len(PLATFORMS)]}
            self.kafka.send(self.topic, key=post["post_id"].encode(), value=json.dumps(post).encode())
            self.sent += 1
        self.kafka.flush()


def run(minutes: float, every: float, backlog: int, work: Path) -> dict:
    from memetrace.settings import Settings

    # a fresh work folder: an earlier run's data dir and Milvus files would start this one on a bigger corpus
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Variants))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["kafka"], bootstrap = start_tansu()
        procs["milvus"], uri = start_milvus_lite(work / "milvus-server")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMETRACE_")}
        env.update({"MEMETRACE_DATA_DIR": str(work / "data"), "MEMETRACE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                    "MEMETRACE_MILVUS_URI": uri, "MEMETRACE_FETCH_ALLOW_PRIVATE_NETWORKS": "1"})
        ports = {name: free_port() for name in SERVICES}
        for name, verb in SERVICES.items():
            log = (work / "logs" / f"{name}.log").open("wb")
            procs[name] = subprocess.Popen([MEMETRACE, *verb], env={**env, "MEMETRACE_METRICS_PORT": str(ports[name])},
                                           stdout=log, stderr=log)
        for name in SERVICES:
            wait_for_port(ports[name], procs[name], 180, f"memetrace {name}")
        producer = Producer(bootstrap, Settings(_env_file=None).kafka_posts_topic,
                            f"http://127.0.0.1:{server.server_address[1]}")
        return _sample(procs, ports, producer, minutes, every, backlog)
    finally:
        for p in reversed(list(procs.values())):
            stop_process(p, grace=10)
        server.shutdown()


def _sample(procs: dict[str, subprocess.Popen], ports: dict[str, int], producer: Producer, minutes: float,
            every: float, backlog: int) -> dict:
    t0 = time.monotonic()
    windows, last, next_sample = [], {k: 0.0 for k in COUNTERS}, t0 + every
    while time.monotonic() - t0 < minutes * 60:
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited during the run (see the logs)")
        metrics = {name: scrape(port) for name, port in ports.items()}
        consumed = metrics["ingest"].get("memetrace_posts_consumed_total", 0)
        if producer.sent - consumed < backlog:
            producer.send(backlog)
        if time.monotonic() >= next_sample:
            now = {k: metrics[svc].get(metric, 0.0) for k, (svc, metric) in COUNTERS.items()}
            windows.append({"minute": round((time.monotonic() - t0) / 60, 2), "produced": producer.sent,
                            **{k: int(now[k] - last[k]) for k in COUNTERS},
                            "rss_mb": {n: rss_mb(p.pid) for n, p in procs.items()},
                            "load": round(os.getloadavg()[0], 1)})
            print(json.dumps(windows[-1]), flush=True)
            last, next_sample = now, next_sample + every
        time.sleep(2)
    return {"windows": windows, "posts_produced": producer.sent}


def summary(windows: list[dict], warmup: int) -> dict:
    """RSS growth per service from the first window after warm-up to the last, and throughput."""
    if not windows:
        return {"windows": 0}  # a run shorter than one window
    after = windows[warmup:] or windows
    growth = {n: round(100 * (after[-1]["rss_mb"][n] / after[0]["rss_mb"][n] - 1), 1)
              for n in after[0]["rss_mb"] if after[0]["rss_mb"][n]}
    per_window = [w["images_stored"] for w in after]
    return {"rss_growth_after_warmup_pct": growth, "images_stored_per_window": per_window,
            "posts_consumed_total": sum(w["posts_consumed"] for w in windows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=25)
    ap.add_argument("--every", type=float, default=60, help="seconds per sample window")
    ap.add_argument("--backlog", type=int, default=64, help="posts produced ahead of the ingest")
    ap.add_argument("--warmup", type=int, default=3, help="windows not counted in the growth")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "longrun")
    a = ap.parse_args(argv)
    if not SPLIT.is_dir():
        sys.exit(f"no dev split at {SPLIT}: run `make bench` (benchmarks/run.py generates it) first")
    result = run(a.minutes, a.every, a.backlog, a.out / "longrun-work")
    result.update({"summary": summary(result["windows"], a.warmup), "cpu": cpu(), "minutes": a.minutes,
                   "every": a.every, "warmup": a.warmup,
                   "simulated": "the posts (the dev split's files, cropped by k pixels in pass k)",
                   "real": "Tansu, milvus-lite server, memetrace ingest / match / cluster services"})
    (a.out / "longrun.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
