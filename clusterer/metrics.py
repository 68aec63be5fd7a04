"""The clusterer service's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from memetrace.metrics import StreamMetrics, BATCH_BUCKETS


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
                                     buckets=BATCH_BUCKETS, registry=r)
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


COPY_RANKS = (2, 5, 10)  # the n of "time from a cluster's first post to its n-th image" (bounded labels)
DELAY_BUCKETS = (60, 600, 3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400)


class TreeMetrics:
    """What each derivation tree written says of its cluster's spread (observed per tree update)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.copy_delay = Histogram("memetrace_tree_copy_delay_seconds",
                                    "time from a cluster's first post to its n-th image's first post",
                                    ["n"], buckets=DELAY_BUCKETS, registry=r)
        self.platforms = Histogram("memetrace_tree_platforms_reached", "platforms a cluster's posts reached",
                                   buckets=(1, 2, 3, 4, 6, 8, 12), registry=r)
        self.depth = Histogram("memetrace_tree_depth", "edges on a cluster's deepest derivation branch",
                               buckets=(0, 1, 2, 3, 4, 6, 8, 12), registry=r)
        self.trees = Counter("memetrace_trees_updated_total", "derivation trees written", registry=r)
