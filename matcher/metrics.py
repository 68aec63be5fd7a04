"""The matcher service's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from memetrace.metrics import StreamMetrics, ITEM_BUCKETS


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
                                       buckets=ITEM_BUCKETS, registry=r)
