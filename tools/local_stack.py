"""Every streaming service on one machine against the embedded defaults: ``make stack``.

Starts, all on 127.0.0.1::

    Tansu (a Kafka-protocol broker, memory storage)      :9092
    milvus-lite server (data in DATA_DIR/milvus-server)   :19530
    memetrace ingest     /metrics :9101      memetrace match  /metrics :9102
    memetrace cluster    /metrics :9103      memetrace serve  API + /metrics :8000

``--demo`` also builds the demo corpus, serves it over HTTP and produces one post per file, so
the gallery fills within a minute: http://127.0.0.1:8000/gallery. Ctrl-C stops everything.
Service logs (JSON lines) go to DATA_DIR/logs/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.services import serve_folder, start_milvus_lite, start_tansu, stop_process, wait_for_port

MEMETRACE = str(Path(sys.executable).with_name("memetrace"))
PLATFORMS = ("mastodon", "bluesky", "reddit")
SERVICES = {"ingest": ["ingest"], "match": ["match"], "cluster": ["cluster", "--every", "5"],
            "serve": ["serve"]}
METRICS_PORTS = {"ingest": 9101, "match": 9102, "cluster": 9103}


def _env(data_dir: Path, bootstrap: str, milvus: str, api_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMETRACE_")}
    env.update({"MEMETRACE_DATA_DIR": str(data_dir), "MEMETRACE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "MEMETRACE_MILVUS_URI": milvus, "MEMETRACE_API_PORT": str(api_port)})
    return env


def _service_env(name: str, demo: bool) -> dict[str, str]:
    """What one service adds to :func:`_env`: its metrics port; with ``demo``, the ingest may download
    from our own loopback server (only the ingest: the API's URL search keeps its SSRF guard)."""
    env = {"MEMETRACE_METRICS_PORT": str(METRICS_PORTS[name])} if name in METRICS_PORTS else {}
    if demo and name == "ingest":
        env["MEMETRACE_FETCH_ALLOW_PRIVATE_NETWORKS"] = "1"
    return env


def banner(bootstrap: str, milvus_uri: str, api_port: int, logs: Path) -> str:
    """What runs where, printed once every service is up: each service's address and metrics URL."""
    api = f"http://127.0.0.1:{api_port}"
    lines = [f"  Kafka (Tansu)      {bootstrap}", f"  Milvus Lite        {milvus_uri}"]
    for name in SERVICES:
        where = (f"API {api} (gallery {api}/gallery, docs {api}/docs), metrics {api}/metrics" if name == "serve"
                 else f"metrics http://127.0.0.1:{METRICS_PORTS[name]}/metrics")
        lines.append(f"  memetrace {name:<8} {where}")
    return "\n".join(["memetrace stack on 127.0.0.1:", *lines, f"logs in {logs}; Ctrl-C stops everything"])


def _demo_posts(data_dir: Path) -> Path:
    """One post per demo file, served from a loopback HTTP server (a platform picked per file)."""
    from memetrace.cli.demo import make_demo_corpus

    images = make_demo_corpus(data_dir / "demo-corpus")
    _server, base = serve_folder(images)
    posts = data_dir / "demo-posts.jsonl"
    with posts.open("w") as f:
        for path in sorted(images.iterdir()):
            platform = PLATFORMS[hashlib.blake2b(path.name.encode(), digest_size=1).digest()[0] % len(PLATFORMS)]
            f.write(json.dumps({"post_id": f"demo/{path.name}", "url": f"{base}/{path.name}",
                                "platform": platform}) + "\n")
    return posts


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (kill, a backgrounded `make stack`) stops the services too, as Ctrl-C does."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("memetrace-data/stack"))
    parser.add_argument("--api-port", type=int, default=8000)
    parser.add_argument("--demo", action="store_true", help="produce the demo corpus as posts")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    data_dir = args.data_dir.resolve()
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        broker, bootstrap = start_tansu(9092)
        procs.append(broker)
        milvus, uri = start_milvus_lite(data_dir / "milvus-server", 19530)
        procs.append(milvus)
        env = _env(data_dir, bootstrap, uri, args.api_port)
        for name, verb in SERVICES.items():
            log = (data_dir / "logs" / f"{name}.log").open("ab")
            procs.append(subprocess.Popen([MEMETRACE, "-v", *verb], env={**env, **_service_env(name, args.demo)},
                                          stdout=log, stderr=log))
        wait_for_port(args.api_port, procs[-1], 120, "memetrace serve")
        print(banner(bootstrap, uri, args.api_port, data_dir / "logs"), flush=True)
        if args.demo:
            subprocess.run([MEMETRACE, "produce", str(_demo_posts(data_dir))], env=env, check=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        dead = [p.args for p in procs if p.poll() is not None]
        sys.exit(f"stopped: {dead} exited; see {data_dir / 'logs'}")
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not strand the services
            signal.signal(sig, signal.SIG_IGN)
        for p in reversed(procs):
            stop_process(p, grace=10)


if __name__ == "__main__":
    main()
