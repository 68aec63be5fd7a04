"""The clusterer service: ``memetrace cluster --every SECONDS``.

One consumer (group ``kafka_cluster_group_id``) of ``memetrace.images`` and ``memetrace.matches``;
run a single replica: it owns the graph. Its state is a GraphState (SQLite, ``MEMETRACE_CLUSTER_STATE_PATH``)::

    poll ─► image events ─► state.images + state.posts       (first row kept: redelivery-safe)
         └► match events ─► state.matches                    (keyed by pair)
         ─► commit offsets (the SQLite transactions are durable)
    every N seconds: recluster ─► history events, per-cluster stats ─► ClusterBoard (the API reads it)
                               ─► gauges: clusters, images clustered, largest, new, top growing

Events that are not valid contracts (bad JSON, ids out of range, ``a`` ≥ ``b``...) are
dead-lettered by the consume loop (:mod:`memetrace.stream`); an edge whose images were never seen
as image events is kept but left out of the graph until both are (:func:`~memetrace.clusterer.graph.build_graph`).

Each run recomputes and publishes only what the changes since the last saved run touched; a start
resumes from the stored state (labels, clusters, change log). A publish that a crash interrupted
is healed by the next run: the change log is cleared only once a run is published and saved, so
that run recomputes and publishes the same clusters again.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord

from memetrace.cluster_board import ClusterBoard
from memetrace.clusterer.metrics import ClusterMetrics
from memetrace.clusterer.service import ClusterRun, recluster
from memetrace.clusterer.state import GraphState
from memetrace.messages import ImageEvent, MatchEvent
from memetrace.settings import Settings
from memetrace.stream import Abandoned, DeadLetter, StreamConfig, StreamWorker

log = logging.getLogger(__name__)

BATCH = 1000  # events are small; SQLite takes a batch in one transaction


class ClusterWorker(StreamWorker):
    """Keeps the match graph and reclusters it periodically; see the module docstring."""

    name = "cluster"

    def __init__(self, settings: Settings, state: GraphState, board: ClusterBoard, metrics: ClusterMetrics,
                 every_s: float, consumer: KafkaConsumer | None = None,
                 after_run: Callable[[ClusterRun], None] | None = None) -> None:
        """``after_run`` gets each saved run (e.g. to redo the derivation trees of ``run.touched``)."""
        s = settings
        super().__init__(StreamConfig.from_settings(s), metrics, [s.kafka_images_topic, s.kafka_matches_topic],
                         s.kafka_cluster_group_id, BATCH, consumer)
        self.s = s
        self.metrics: ClusterMetrics = metrics
        self.board = board
        self.state = state
        self.every_s = every_s
        self.after_run = after_run
        self.last_run: ClusterRun | None = None
        # each cluster's growth rank (ClusterSummary.growth_rank, whose last item is the cluster id) and
        # posts as of its latest run in this process: a run summarizes only the clusters it touched,
        # the top-N gauges rank them all; three ints per cluster, not whole summaries
        self._ranks: dict[int, tuple[tuple[int, int, int, int], int]] = {}
        self._next_run = 0.0  # monotonic; 0 = at the first tick
        self._dirty = True

    def process(self, records: Sequence[ConsumerRecord]) -> list[DeadLetter]:
        edges, dead = self.parse(MatchEvent, [r for r in records if r.topic == self.s.kafka_matches_topic])
        events, dead_images = self.parse(ImageEvent, [r for r in records if r.topic != self.s.kafka_matches_topic])
        matches = [e.to_match() for _, e in edges]
        images = [(e.image_id, e.nb_points) for _, e in events]
        posts = [(e.post.post_id, e.image_id, e.post.posted_at, e.post.platform) for _, e in events]
        self.state.add_images(images)
        self.state.add_posts(posts)
        self.state.add_matches(matches)
        self.metrics.posts_consumed.inc(len(posts))
        self.metrics.edges_consumed.inc(len(matches))
        self._dirty = True
        return dead + dead_images

    def tick(self) -> None:
        if time.monotonic() >= self._next_run:  # its state write waits out a full or locked disk too
            self.retry("recluster", self.run_once, poison=False)

    def close(self) -> None:
        if not self._dirty:
            return
        try:
            self.run_once()  # leave the published clusters up to date with what was committed
        except Abandoned:
            log.warning("last reclustering abandoned (cluster board down): the next run publishes it")

    def run_once(self) -> ClusterRun:
        """Recluster now, publish to the ClusterBoard (retried while it is down), update the gauges."""
        run = recluster(self.state, self.s.cluster_algorithm, now=time.time(),
                        publish=lambda *a: self.retry("cluster board", lambda: self.board.publish(*a)))
        self.last_run, self._dirty = run, False
        if self.after_run is not None:
            self.after_run(run)
        self._next_run = time.monotonic() + self.every_s
        self._observe(run)
        log.info("reclustered", extra={"clusters": run.clusters, "images": run.images_clustered,
                                       "touched": run.images_touched,
                                       "largest": run.largest, "new": run.new_clusters,
                                       "events": len(run.events), "seconds": round(run.seconds, 3)})
        return run

    def _observe(self, run: ClusterRun) -> None:
        m = self.metrics
        m.runs.inc()
        m.run_seconds.observe(run.seconds)
        m.clusters.set(run.clusters)
        m.images_clustered.set(run.images_clustered)
        m.largest.set(run.largest)
        m.new_clusters.set(run.new_clusters)
        m.new_clusters_total.inc(run.new_clusters)
        for e in run.events:
            m.events.labels(e.event).inc()
        m.top_growth.clear()  # the top N changes: old series must go, or cardinality grows
        m.top_size.clear()
        for cid in run.removed:
            self._ranks.pop(cid, None)
        self._ranks.update((c.cluster_id, (c.growth_rank(), c.posts)) for c in run.summaries)
        for rank, (key, posts) in enumerate(heapq.nsmallest(self.s.cluster_top_n, self._ranks.values()), start=1):
            m.top_growth.labels(str(rank), str(key[-1])).set(-key[0])
            m.top_size.labels(str(rank), str(key[-1])).set(posts)
