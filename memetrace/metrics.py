"""Prometheus metrics, registered on a :class:`CollectorRegistry` the caller owns.

Nothing here touches prometheus_client's global default registry: a process builds one registry,
hands it to its stage's metrics class (a :class:`StreamMetrics` for the streaming services) and to :func:`serve`, and a test builds a fresh one each time.
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
ITEM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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
                                       buckets=BATCH_BUCKETS, registry=r)
        self.batch_size = Histogram("memetrace_batch_size", "messages per batch", buckets=SIZE_BUCKETS, registry=r)
        self.consumer_lag = Gauge("memetrace_consumer_lag", "high-water mark minus position, per partition",
                                  ["topic", "partition"], registry=r)
        self.deadlettered = Counter("memetrace_deadlettered_total", "messages sent to the dead-letter topic",
                                    ["reason"], registry=r)
        self.poison = Counter("memetrace_poison_messages_total", "messages dead-lettered because a write of "
                              "theirs kept failing while the dependency answered", ["dependency"], registry=r)








#: what a readiness callback answers: ready or not, or (ready, why not)
Readiness = Callable[[], bool | tuple[bool, str]]


def health_app(registry: CollectorRegistry, ready: Readiness = lambda: True):
    """WSGI app: ``/metrics`` of ``registry``, ``/healthz`` (200 while the process serves),
    ``/readyz`` (200 when ``ready()``, else 503 with the reason ``ready()`` gave: the probe
    Kubernetes uses to route work)."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            answer = True if path == "/healthz" else ready()
            ok, why = answer if isinstance(answer, tuple) else (answer, "")
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else f"not ready{': ' + why if why else ''}\n".encode("utf-8", "replace")]
        if path == "/metrics":
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: use /metrics, /healthz or /readyz\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - one line per scrape is noise
        pass


def serve(registry: CollectorRegistry, port: int, host: str = "0.0.0.0",
          ready: Readiness = lambda: True) -> WSGIServer | None:
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

