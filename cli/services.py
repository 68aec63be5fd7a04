"""The streaming services built from settings: the bodies of ``memetrace ingest``, ``match`` and ``cluster``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from memetrace.cli.context import Context
from memetrace.clusterer.metrics import ClusterMetrics, TreeMetrics
from memetrace.clusterer.service import ClusterRun
from memetrace.clusterer.tree_update import update_trees
from memetrace.clusterer.worker import ClusterWorker
from memetrace.ingest.metrics import IngestMetrics
from memetrace.ingest.worker import IngestWorker
from memetrace.kafka_clients import ensure_topics
from memetrace.matcher.metrics import MatchMetrics
from memetrace.matcher.worker import MatchWorker
from memetrace.settings import Settings
from memetrace.stream import run_service


def run_ingest(settings: Settings, max_idle: float | None = None,
               registry: CollectorRegistry | None = None) -> IngestWorker:
    s = settings
    ensure_topics(s, [s.kafka_posts_topic, s.kafka_images_topic, s.kafka_deadletter_topic])
    worker = ingest_worker(Context(s), IngestMetrics(registry or CollectorRegistry()))
    run_service(worker, max_idle)
    return worker


def ingest_worker(ctx: Context, metrics: IngestMetrics) -> IngestWorker:
    """An ingest worker on the components of ``ctx``."""
    return IngestWorker(ctx.settings, metrics, embedder=ctx.embedder, extractor=ctx.extractor, index=ctx.index,
                        occurrences=ctx.occurrences, features=ctx.features)


def run_match(settings: Settings, max_idle: float | None = None,
              registry: CollectorRegistry | None = None) -> MatchWorker:
    s = settings
    ensure_topics(s, [s.kafka_images_topic, s.kafka_matches_topic, s.kafka_deadletter_topic])
    ctx = Context(s)
    worker = MatchWorker(s, ctx.matcher, MatchMetrics(registry or CollectorRegistry()))
    run_service(worker, max_idle)
    return worker


def run_cluster(settings: Settings, every_s: float, max_idle: float | None = None,
                registry: CollectorRegistry | None = None) -> ClusterWorker:
    s = settings
    ensure_topics(s, [s.kafka_images_topic, s.kafka_matches_topic, s.kafka_deadletter_topic])
    ctx = Context(s)
    registry = registry or CollectorRegistry()
    tree_metrics = TreeMetrics(registry)

    def redo_trees(run: ClusterRun) -> None:  # the trees of the clusters the run touched, nothing else
        update_trees(ctx.graph_state, ctx.features, ctx.trees, run.touched, metrics=tree_metrics,
                     verify=ctx.verify_pairs, cache=ctx.tree_edges)

    worker = ClusterWorker(s, ctx.graph_state, ctx.board, ClusterMetrics(registry), every_s, after_run=redo_trees)
    run_service(worker, max_idle)
    return worker
