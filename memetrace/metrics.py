"""Prometheus metrics, registered on a :class:`CollectorRegistry` the caller owns.

Nothing here touches prometheus_client's global default registry: a process builds one registry,
hands it to :class:`IngestMetrics` (and to :func:`serve`), and a test builds a fresh one each time.
Names follow Prometheus conventions: ``memetrace_*_total`` counters, ``memetrace_*_seconds``
histograms.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

log = logging.getLogger(__name__)

# per-item stages: milliseconds to tens of seconds; batch stages go higher
_ITEM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class StreamMetrics:
    """What every Kafka-consuming service reports (ingest, match, cluster); one instance per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.batches = Counter("memetrace_batches_total", "batches stored in every sink", registry=r)
        self.retries = Counter("memetrace_retries_total", "retried writes while a dependency was down",
                               ["target"], registry=r)
        for target in ("milvus", "kafka"):  # a healthy service reports 0, not "no data"
            self.retries.labels(target)
        self.batch_seconds = Histogram("memetrace_batch_seconds", "poll to commit of one batch",
                                       buckets=_BATCH_BUCKETS, registry=r)
        self.batch_size = Histogram("memetrace_batch_size", "messages per batch", buckets=_SIZE_BUCKETS, registry=r)
        self.consumer_lag = Gauge("memetrace_consumer_lag", "high-water mark minus position, per partition",
                                  ["topic", "partition"], registry=r)


class IngestMetrics(StreamMetrics):
    """Everything the ingest worker reports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        r = registry
        self.posts_consumed = Counter("memetrace_posts_consumed_total", "posts-topic messages consumed", registry=r)
        self.images_stored = Counter("memetrace_images_stored_total", "new images written to Milvus", registry=r)
        self.duplicates = Counter("memetrace_duplicates_total",
                                  "posts whose image was already stored (same bytes)", registry=r)
        self.occurrences = Counter("memetrace_occurrences_total", "post occurrences written", registry=r)
        self.download_failures = Counter("memetrace_download_failures_total", "failed downloads by reason",
                                         ["reason"], registry=r)
        self.deadlettered = Counter("memetrace_deadlettered_total", "messages sent to the dead-letter topic",
                                    ["reason"], registry=r)
        self.downloaded_bytes = Counter("memetrace_downloaded_bytes_total", "image bytes downloaded", registry=r)
        self.download_seconds = Histogram("memetrace_download_seconds", "one URL, retries included",
                                          buckets=_ITEM_BUCKETS, registry=r)
        self.decode_seconds = Histogram("memetrace_decode_seconds", "decode + regions + thumbnail of one image",
                                        buckets=_ITEM_BUCKETS, registry=r)
        self.sift_seconds = Histogram("memetrace_sift_seconds", "SIFT keypoints of one image",
                                      buckets=_ITEM_BUCKETS, registry=r)
        self.embed_batch_seconds = Histogram("memetrace_embed_batch_seconds", "embedding one batch of images",
                                             buckets=_BATCH_BUCKETS, registry=r)
        self.milvus_write_seconds = Histogram("memetrace_milvus_write_seconds", "one Milvus upsert call",
                                              buckets=_ITEM_BUCKETS, registry=r)
        self.device = Gauge("memetrace_device_info", "1 for the torch device the embedder runs on",
                            ["device"], registry=r)


class MatchMetrics(StreamMetrics):
    """The matcher service: images matched, verified edges published, time per image."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        r = registry
        self.images_matched = Counter("memetrace_images_matched_total", "image events matched", registry=r)
        self.matches = Counter("memetrace_matches_total", "verified copy edges published, by kind",
                               ["kind"], registry=r)
        self.match_seconds = Histogram("memetrace_match_seconds",
                                       "candidates + verification per image (a batch's time / its images)",
                                       buckets=_ITEM_BUCKETS, registry=r)


class ClusterMetrics(StreamMetrics):
    """The clusterer service: graph input, and the state after each reclustering run."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        r = registry
        self.edges_consumed = Counter("memetrace_cluster_edges_consumed_total", "match edges consumed", registry=r)
        self.posts_consumed = Counter("memetrace_cluster_posts_consumed_total", "image events (posts) consumed",
                                      registry=r)
        self.runs = Counter("memetrace_cluster_runs_total", "reclustering runs", registry=r)
        self.run_seconds = Histogram("memetrace_cluster_run_seconds", "one reclustering run",
                                     buckets=_BATCH_BUCKETS, registry=r)
        self.clusters = Gauge("memetrace_clusters", "clusters of 2+ images", registry=r)
        self.images_clustered = Gauge("memetrace_images_clustered", "images in clusters of 2+ images", registry=r)
        self.largest = Gauge("memetrace_largest_cluster_images", "images in the largest cluster", registry=r)
        self.new_clusters = Gauge("memetrace_new_clusters_last_run", "clusters created by the last run", registry=r)
        self.new_clusters_total = Counter("memetrace_new_clusters_total", "clusters created", registry=r)
        self.events = Counter("memetrace_cluster_events_total", "cluster history events, by kind",
                              ["event"], registry=r)
        # bounded cardinality: rank 1..cluster_top_n, the series are replaced on every run
        self.top_growth = Gauge("memetrace_cluster_growth_posts",
                                "posts in the last hour of the fastest-growing clusters",
                                ["rank", "cluster_id"], registry=r)
        self.top_size = Gauge("memetrace_cluster_size_posts", "posts of the same fastest-growing clusters",
                              ["rank", "cluster_id"], registry=r)


def health_app(registry: CollectorRegistry, ready: Callable[[], bool] = lambda: True):
    """WSGI app: ``/metrics`` of ``registry``, ``/healthz`` (200 while the process serves),
    ``/readyz`` (200 when ``ready()``, else 503: the probe Kubernetes uses to route work)."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok = path == "/healthz" or ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready\n"]
        if path == "/metrics":
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: use /metrics, /healthz or /readyz\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - one line per scrape is noise
        pass


def serve(registry: CollectorRegistry, port: int, host: str = "0.0.0.0",
          ready: Callable[[], bool] = lambda: True) -> WSGIServer | None:
    """Serve :func:`health_app` from a daemon thread; ``port`` 0 = off (returns None)."""
    if port == 0:
        return None
    try:
        server = make_server(host, port, health_app(registry, ready), ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port} ({exc}); set MEMETRACE_METRICS_PORT to a free "
                      "port, or 0 to turn metrics off") from exc
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics served", extra={"host": host, "port": port, "paths": ["/metrics", "/healthz", "/readyz"]})
    return server


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class ApiMetrics:
    """The query API (``memetrace serve``); ``route`` is the route template (bounded cardinality)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.requests = Counter("memetrace_api_requests_total", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("memetrace_api_request_seconds", "one HTTP request, body read included",
                                         ["route"], buckets=_ITEM_BUCKETS, registry=r)
        self.search_seconds = Histogram("memetrace_search_seconds", "decode + embed + SIFT + Milvus + verify "
                                        "of one searched image", buckets=_ITEM_BUCKETS, registry=r)
