"""The Grafana dashboard against a real Prometheus (Debian's ``prometheus`` binary, 127.0.0.1 only).

* the dashboard JSON is well formed, and every metric it names is one the services register
* Prometheus scrapes a real in-process ``/metrics`` endpoint; promtool accepts the generated config;
  every dashboard expression is valid PromQL
* end to end: Tansu, a Milvus Lite server, a photo server and the services as subprocesses
  (``memetrace ingest``, ``match``, ``cluster --every 2``, ``serve``), scraped by Prometheus; every
  dashboard expression has data
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import load_photo
from kafka_broker import Broker, kafka_broker  # noqa: F401
from prometheus_client import CollectorRegistry
from prometheus_server import Prometheus, check_config, prometheus_server
from streaming import (  # noqa: F401
    MEMETRACE,
    REPO,
    PhotoServer,
    ingest_env,
    milvus_server,
    photo_server,
    produce,
    write_posts,
)

from benchmarks.services import free_port, stop_process, wait_for_port
from memetrace.api.metrics import ApiMetrics
from memetrace.clusterer.metrics import ClusterMetrics
from memetrace.matcher.metrics import MatchMetrics
from memetrace.ingest.metrics import IngestMetrics
from memetrace.metrics import serve

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "memetrace.json"
METRIC_NAME = re.compile(r"\bmemetrace_[a-z0-9_]+")

# Grafana fills these in before querying; Prometheus' HTTP API does not know them. The rate window
# covers a whole test run (Grafana picks ~1m for a 15 s scrape), so what happened early still counts.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "5m", "$job": ".*"}


def promql(expr: str) -> str:
    """A dashboard expression as Prometheus evaluates it once Grafana substituted its variables."""
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel id, title and refId, expr) of every query, the ``job`` variable's series selector included."""
    d = dashboard()
    out = [(f"#{p['id']} {p['title']} / {t['refId']}", t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":  # label_values(SELECTOR, label): the selector must find series
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"]).group(1)
            out.append((f"variable ${var['name']}", selector))
    return out


def registered_metric_names() -> set[str]:
    """Every sample name the services' metric classes can expose (counters' _total, histograms' parts)."""
    names: set[str] = set()
    for cls in (IngestMetrics, MatchMetrics, ClusterMetrics, ApiMetrics):
        registry = CollectorRegistry()
        cls(registry)
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names.update(family.name + s for s in suffixes)
    return names


# ----------------------------------------------------------------------------- the JSON alone


def test_dashboard_is_well_formed() -> None:
    d = dashboard()
    assert d["uid"] == "memetrace" and 36 <= d["schemaVersion"] <= 41
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(g) and all(isinstance(g[k], int) for k in "hwxy"), p["title"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":  # a row only groups the panels below it
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
        assert p["targets"], f"{p['title']}: no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refId"
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "prometheus", (p["title"], t)
            assert 'job=~"$job"' in t["expr"], f"{p['title']} / {t['refId']} ignores the $job variable"
    # no two panels overlap on the grid
    cells = [(x, y) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), "overlapping panels"


def test_dashboard_names_only_metrics_the_services_register() -> None:
    known = registered_metric_names()
    used = {name for _, expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert used - known == set(), f"dashboard metrics no service registers: {sorted(used - known)}"


# ----------------------------------------------------------------------------- one real scrape


def test_prometheus_scrapes_a_metrics_endpoint_and_parses_every_dashboard_expr(tmp_path: Path) -> None:
    m = IngestMetrics(CollectorRegistry())
    m.posts_consumed.inc(7)
    m.download_failures.labels("http_404").inc()
    for seconds in (0.02, 0.03, 0.04, 2.0):
        m.download_seconds.observe(seconds)
    port = free_port()
    server = serve(m.registry, port, host="127.0.0.1")
    try:
        with prometheus_server({"ingest": [f"127.0.0.1:{port}"]}, tmp_path / "prom") as prom:
            checked = check_config(prom.config)
            assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr

            prom.wait_for_targets_up()
            assert [float(s["value"][1]) for s in prom.query('up{job="ingest"}')] == [1.0]
            assert [float(s["value"][1]) for s in prom.query('memetrace_posts_consumed_total{job="ingest"}')] == [7.0]
            got = prom.query('memetrace_download_failures_total{job="ingest"}')
            assert [(s["metric"]["reason"], float(s["value"][1])) for s in got] == [("http_404", 1.0)]
            # the dashboard's quantile form: 3 of 4 downloads fell in the (0.025, 0.05] bucket
            p50 = prom.query(promql('histogram_quantile(0.5, sum by (le) '
                                    '(memetrace_download_seconds_bucket{job=~"$job"}))'))
            assert 0.025 < float(p50[0]["value"][1]) <= 0.05

            # every dashboard expression parses and evaluates (most are empty: one service here)
            errors = []
            for where, expr in dashboard_exprs():
                try:
                    prom.query(promql(expr))
                except AssertionError as exc:
                    errors.append(f"{where}: {exc}")
            assert not errors, "\n".join(errors)
            posts_rate = next(e for w, e in dashboard_exprs() if w.endswith("Ingest rate / A"))
            assert prom.query_until(promql(posts_rate)), "posts/s: no data"
    finally:
        server.shutdown()


# ----------------------------------------------------------------------------- end to end

def has_data(result: list) -> bool:
    """A sample with a finite value: a quantile over buckets that never moved in the window is NaN."""
    return any(math.isfinite(float(s["value"][1])) for s in result)


def copies(photos: PhotoServer) -> None:
    """Two edited copies on the photo server: a crop of the cat (a partial match), the coffee smaller
    and recompressed (a full match)."""
    for name, edit, quality in (("cat-crop", lambda im: im.crop((60, 40, im.width - 40, im.height - 30)), 80),
                                ("coffee-small", lambda im: im.resize((im.width * 3 // 4, im.height * 3 // 4)), 60)):
        buf = io.BytesIO()
        edit(load_photo(name.split("-")[0])).save(buf, format="JPEG", quality=quality)
        photos.jpegs[name] = buf.getvalue()


def wait_for_data(prom: Prometheus, exprs: list[tuple[str, str]], timeout: float) -> dict[str, list]:
    """Evaluates every expression until each has data (or ``timeout``); the last result of each."""
    deadline = time.monotonic() + timeout
    while True:
        results = {where: prom.query(promql(expr)) for where, expr in exprs}
        if all(has_data(r) for r in results.values()) or time.monotonic() > deadline:
            return results
        time.sleep(1)


def search(api: str, url: str) -> dict:
    """``POST /v1/search`` by URL (the API downloads it: private networks allowed in this test)."""
    req = urllib.request.Request(f"{api}/v1/search", data=json.dumps({"url": url}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until ``url`` answers 200 (the API's /readyz: model loaded, Milvus answering)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{url}: the process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{url} not ready after {timeout} s"
        time.sleep(0.25)


def test_every_dashboard_expr_has_data_from_the_running_services(
        kafka_broker: Broker, photo_server: PhotoServer, milvus_server: str, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture) -> None:
    t_start = time.monotonic()
    copies(photo_server)
    tag = uuid.uuid4().hex[:8]
    env = ingest_env(tmp_path, kafka_broker, MEMETRACE_MILVUS_URI=milvus_server,
                     MEMETRACE_KAFKA_MATCHES_TOPIC=f"matches-{tag}", MEMETRACE_KAFKA_MATCH_GROUP_ID=f"match-{tag}",
                     MEMETRACE_KAFKA_CLUSTER_GROUP_ID=f"cluster-{tag}", MEMETRACE_METRICS_HOST="127.0.0.1")
    (tmp_path / "cluster").mkdir()
    # the job names of deploy/prometheus/prometheus.yml; the API serves /metrics on its own port
    ports = {job: free_port() for job in ("memetrace-ingest", "memetrace-match", "memetrace-cluster",
                                          "memetrace-serve")}
    # the clusterer owns its SQLite state (as in docker-compose.yml); every service logs to a file
    # whose tail a failure shows (the services log JSON lines, tracebacks are plain text)
    commands = {"memetrace-ingest": ["ingest"], "memetrace-match": ["match"],
                "memetrace-cluster": ["cluster", "--every", "2"],
                "memetrace-serve": ["serve", "--host", "127.0.0.1", "--port", str(ports["memetrace-serve"])]}
    extra = {"memetrace-cluster": {"MEMETRACE_CLUSTER_STATE_PATH": str(tmp_path / "cluster" / "state.db")}}
    services: dict[str, subprocess.Popen] = {}
    for job, args in commands.items():
        with (tmp_path / f"{job}.log").open("wb") as log:
            services[job] = subprocess.Popen(
                [MEMETRACE, "-v", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **env, "MEMETRACE_METRICS_PORT": str(ports[job]), **extra.get(job, {})})
    api = f"http://127.0.0.1:{ports['memetrace-serve']}"

    def logs() -> str:
        return "\n".join(f"--- {job}: " + "\n".join((tmp_path / f"{job}.log").read_text().splitlines()[-8:])
                         for job in services)

    try:
        with prometheus_server({job: [f"127.0.0.1:{port}"] for job, port in ports.items()}, tmp_path / "prom") as prom:
            try:
                for job, proc in services.items():  # /metrics is served once a service is set up
                    wait_for_port(ports[job], proc, 120, job)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{logs()}") from None
            prom.wait_for_targets_up(timeout=30)
            t_up = time.monotonic()

            # after the first scrape, so every counter and histogram is seen moving from its start
            base = photo_server.base
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # growth counts the last hour's posts
            posts = [{"post_id": f"o{i}", "url": f"{base}/img/{name}", "platform": "x", "posted_at": now}
                     for i, name in enumerate(["cat", "coffee", "rocket", "coins", "cat"])]
            posts += [{"post_id": "o-crop", "url": f"{base}/img/cat-crop", "platform": "y", "posted_at": now},
                      {"post_id": "o-small", "url": f"{base}/img/coffee-small", "platform": "y", "posted_at": now},
                      {"post_id": "o-gone", "url": f"{base}/missing.jpg"}]  # a 404: failure and dead letter
            produce(env, write_posts(tmp_path / "posts.txt", posts))

            wait_ready(f"{api}/readyz", services["memetrace-serve"], 120)
            assert "matches" in search(api, f"{base}/img/cat-crop")  # found or not: the request is what counts

            exprs = dashboard_exprs()
            results = wait_for_data(prom, exprs, timeout=60)
            t_data = time.monotonic()
            empty = [f"{where}: {promql(dict(exprs)[where])}" for where, r in results.items() if not r]
            nan = [f"{where}: {promql(dict(exprs)[where])}" for where, r in results.items() if r and not has_data(r)]
            assert not empty and not nan, ("dashboard queries without data:\n  " + "\n  ".join(empty)
                                           + "\nonly NaN (nothing observed in the window):\n  " + "\n  ".join(nan)
                                           + f"\n{logs()}")
            # the numbers behind the panels are this run's (PromQL comparisons filter: empty = false)
            for check in (f"sum(memetrace_posts_consumed_total) == {len(posts)}", "max(memetrace_clusters) >= 1",
                          'sum(memetrace_deadlettered_total{reason="download_http_404"}) == 1',
                          'sum(memetrace_api_requests_total{route="/v1/search", status="200"}) == 1'):
                assert prom.query_until(check, timeout=30), f"not true in Prometheus: {check}"
            with capsys.disabled():
                print(f"\n[observability] {len(results)}/{len(exprs)} dashboard queries have data; services up and scraped "
                      f"{t_up - t_start:.1f} s after the start, every query with data {t_data - t_up:.1f} s later")
    finally:
        for proc in services.values():
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: each service stops cleanly
        for proc in services.values():
            stop_process(proc, grace=30)
