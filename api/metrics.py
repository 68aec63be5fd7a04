"""The query API's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from memetrace.metrics import ITEM_BUCKETS


class ApiMetrics:
    """The query API (``memetrace serve``); ``route`` is the route template (bounded cardinality)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.requests = Counter("memetrace_api_requests_total", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("memetrace_api_request_seconds", "one HTTP request, body read included",
                                         ["route"], buckets=ITEM_BUCKETS, registry=r)
        # query="upload": decode + embed + SIFT + Milvus + verify; "stored": Milvus + verify of a stored image
        self.search_seconds = Histogram("memetrace_search_seconds", "one search, by kind of query (upload, stored)",
                                        ["query"], buckets=ITEM_BUCKETS, registry=r)
        for kind in ("upload", "stored"):  # both series exist from the start: a first search moves them
            self.search_seconds.labels(query=kind)
