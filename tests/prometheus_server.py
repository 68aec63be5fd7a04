"""A real Prometheus server for tests: Debian's ``prometheus`` binary (``make system-deps``).

Use it from a test::

    from prometheus_server import prometheus_server

    with prometheus_server({"ingest": ["127.0.0.1:9101"]}, tmp_path) as prom:
        prom.wait_for_targets_up()
        prom.query('memetrace_posts_consumed_total{job="ingest"}')

It listens on 127.0.0.1 only, on a free port, keeps its TSDB in its own directory, scrapes every
second, and is stopped (SIGTERM, then SIGKILL) when the block ends. Debian's package may also
start a systemd ``prometheus`` service on :9090: these tests never use it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.services import free_port, stop_process, wait_for_port

SCRAPE_INTERVAL = "1s"  # tests want data within seconds; the timeout may not exceed the interval


def binary(name: str = "prometheus") -> str:
    """Path of ``prometheus`` or ``promtool``; a clear error when the Debian package is missing."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"no `{name}` on PATH: run `make system-deps` (apt-get install prometheus)")
    return path


def write_config(path: Path, targets: dict[str, list[str]]) -> Path:
    """A scrape config: one job per service name, static ``host:port`` targets, ``/metrics`` every second."""
    lines = ["global:", f"  scrape_interval: {SCRAPE_INTERVAL}", f"  scrape_timeout: {SCRAPE_INTERVAL}",
             f"  evaluation_interval: {SCRAPE_INTERVAL}", "scrape_configs:"]
    for job, addrs in targets.items():
        lines += [f"  - job_name: {json.dumps(job)}", "    static_configs:",
                  f"      - targets: {json.dumps(list(addrs))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_config(path: Path) -> subprocess.CompletedProcess:
    """``promtool check config`` (Prometheus' own validator): returncode 0 and SUCCESS on stdout when valid."""
    return subprocess.run([binary("promtool"), "check", "config", str(path)], capture_output=True, text=True,
                          timeout=30)


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    config: Path
    log: Path

    def api(self, path: str, **params: str) -> dict | list:
        """GET ``/api/v1/<path>``; its ``data``, or an AssertionError with Prometheus' error."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422: the body says why (e.g. a PromQL parse error)
            body = json.load(exc)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list:
        """Instant query: the result samples (a scalar or string result comes back as a one-item list)."""
        data = self.api("query", query=expr)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [result]

    def query_until(self, expr: str, timeout: float = 15) -> list:
        """``query(expr)`` until it is non-empty (``rate()`` needs two scrapes); [] after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)) and time.monotonic() < deadline:
            time.sleep(0.25)
        return result

    def targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def wait_for_targets_up(self, timeout: float = 30) -> list[dict]:
        """Until every configured target was scraped successfully (health ``up``); the targets."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            if time.monotonic() > deadline:
                down = [(t["labels"].get("job"), t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
                raise TimeoutError(f"Prometheus targets not all up after {timeout} s: {down}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            time.sleep(0.25)


def start_prometheus(targets: dict[str, list[str]], workdir: Path, timeout: float = 30) -> Prometheus:
    """``prometheus`` on a free 127.0.0.1 port with its own config and TSDB under ``workdir``; ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "prometheus.yml", targets)
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                                 "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, config, log)
    try:
        wait_for_port(port, proc, timeout, "prometheus")
        _wait_ready(prom, timeout)
    except BaseException:
        stop_prometheus(prom)
        raise
    return prom


def _wait_ready(prom: Prometheus, timeout: float) -> None:
    """The port opens before the TSDB is loaded: ``/-/ready`` answers 200 only once queries work."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if prom.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {prom.proc.returncode}: {prom.log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"prometheus not ready after {timeout} s: {prom.log.read_text()[-2000:]}")
        time.sleep(0.1)


def stop_prometheus(prom: Prometheus, grace: float = 10) -> None:
    """SIGTERM (Prometheus closes its TSDB cleanly), SIGKILL if it is still there after ``grace`` s."""
    stop_process(prom.proc, grace)


@contextmanager
def prometheus_server(targets: dict[str, list[str]], workdir: Path) -> Iterator[Prometheus]:
    prom = start_prometheus(targets, workdir)
    try:
        yield prom
    finally:
        stop_prometheus(prom)
