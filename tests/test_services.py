"""The three streaming services together on real local services (Tansu, a Milvus Lite server, a
photo HTTP server, all on 127.0.0.1): ingest → memetrace.images → match → memetrace.matches →
cluster → Milvus, running concurrently in one process (each with its own clients).

* copies (a crop, a recompression, the same file posted twice) end in one cluster per photo, with
  posts and platforms counted, no edge between different photos
* redelivery: a second matcher group and a second clusterer group re-read everything: the same
  edges, the same clusters and ids, no new history
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import load_photo, make_settings
from kafka_broker import Broker, kafka_broker  # noqa: F401
from prometheus_client import CollectorRegistry
from streaming import (PhotoServer, ingest_env, milvus_server, photo_server, produce, read_topic,  # noqa: F401
                       settings_from, write_posts)
from test_poison import ListConsumer

from memetrace.cluster_board import MemoryClusterBoard
from memetrace.clusterer.tree_update import update_trees
from memetrace.clusterer.worker import ClusterWorker
from memetrace.errors import DependencyDown
from memetrace.messages import MatchEvent
from memetrace.matcher.matching import MatchConfig, Matcher
from memetrace.matcher.worker import MatchWorker
from memetrace.clusterer.state import SqliteGraphState
from memetrace.models import Match
from memetrace.cli.context import Context
from memetrace.cli.services import ingest_worker
from memetrace.imageio import content_id
from memetrace.kafka_clients import ensure_topics
from memetrace.clusterer.metrics import ClusterMetrics
from memetrace.ingest.metrics import IngestMetrics
from memetrace.matcher.metrics import MatchMetrics
from memetrace.milvus import MilvusClusterBoard, MilvusConfig, MilvusOccurrenceLog, MilvusVectorIndex, connect
from memetrace.settings import Settings
from memetrace.stream import Abandoned
from memetrace.tree_store import MemoryTreeStore

IDLE_S = 6  # each service exits after this long without a message


def _jpeg(im, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _copies(photo_server: PhotoServer) -> dict[str, bytes]:
    """Served next to the originals: a crop and a recompression of cat, a crop of coffee."""
    cat, coffee = load_photo("cat"), load_photo("coffee")
    w, h = cat.size
    extra = {"cat-crop": _jpeg(cat.crop((w // 8, h // 8, w * 7 // 8, h * 7 // 8))),
             "cat-q40": _jpeg(cat, 40),
             "coffee-crop": _jpeg(coffee.crop((0, 0, coffee.size[0] * 3 // 4, coffee.size[1] * 3 // 4)))}
    photo_server.jpegs.update(extra)
    return extra


def _services(s: Settings, embedder, cluster_group: str | None = None, match_group: str | None = None):
    ctx = Context(s, embedder=embedder)  # the session's model: no second load
    ingest = ingest_worker(ctx, IngestMetrics(CollectorRegistry()))
    ms = s.model_copy(update={"kafka_match_group_id": match_group or s.kafka_match_group_id})
    matcher = Matcher(MatchConfig.from_settings(ms), Context(ms).index, ctx.features)
    match = MatchWorker(ms, matcher, MatchMetrics(CollectorRegistry()))
    cs = s.model_copy(update={"kafka_cluster_group_id": cluster_group or s.kafka_cluster_group_id})
    cluster = ClusterWorker(cs, SqliteGraphState(s.data_dir / "cluster-state.db"), Context(cs).board,
                            ClusterMetrics(CollectorRegistry()), every_s=1.0)
    return ingest, match, cluster


def _run_all(*workers, idle_s: float = IDLE_S, limit_s: float = 180) -> None:
    threads = [threading.Thread(target=w.run, kwargs={"max_idle": idle_s}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=limit_s)
        assert not t.is_alive(), f"a service did not stop within {limit_s:.0f} s"


def test_ingest_match_cluster_end_to_end(kafka_broker: Broker, photo_server: PhotoServer, milvus_server: str,
                                         embedder, tmp_path: Path) -> None:
    tag = "svc"
    env = ingest_env(tmp_path, kafka_broker, MEMETRACE_MILVUS_URI=milvus_server, MEMETRACE_REGIONS="1")
    env.update({"MEMETRACE_KAFKA_MATCHES_TOPIC": env["MEMETRACE_KAFKA_IMAGES_TOPIC"] + "-matches",
                "MEMETRACE_KAFKA_MATCH_GROUP_ID": env["MEMETRACE_KAFKA_INGEST_GROUP_ID"] + "-match",
                "MEMETRACE_KAFKA_CLUSTER_GROUP_ID": env["MEMETRACE_KAFKA_INGEST_GROUP_ID"] + "-cluster"})
    s = settings_from(env)
    ensure_topics(s, [s.kafka_images_topic, s.kafka_matches_topic, s.kafka_deadletter_topic])
    extra = _copies(photo_server)
    base = photo_server.base
    posts = [{"post_id": f"{tag}-{name}", "url": f"{base}/img/{name}", "platform": "x",
              "posted_at": "2026-11-24T00:00:00Z"} for name in ("cat", "coffee", "astronaut", "rocket", *extra)]
    posts.append({"post_id": f"{tag}-cat-again", "url": f"{base}/img/cat?again=1", "platform": "y"})
    produce(env, write_posts(tmp_path / "posts.txt", posts))

    ingest, match, cluster = _services(s, embedder)
    _run_all(ingest, match, cluster)

    assert ingest.totals.occurrences == len(posts) and ingest.totals.new_images == len(posts) - 1
    ids = {name: content_id(photo_server.jpegs[name]) for name in ("cat", "coffee", "astronaut", "rocket", *extra)}
    edges = {(e.a, e.b) for e in (MatchEvent.model_validate_json(r.value)
                                  for r in read_topic(s, s.kafka_matches_topic, 3))}
    pairs = {tuple(sorted((ids[a], ids[b]))) for a, b in
             [("cat", "cat-crop"), ("cat", "cat-q40"), ("cat-crop", "cat-q40"), ("coffee", "coffee-crop")]}
    assert edges <= pairs, "an edge links two different photos"
    assert {tuple(sorted((ids["cat"], ids["cat-q40"]))), tuple(sorted((ids["coffee"], ids["coffee-crop"])))} <= edges

    state = cluster.state.clusters()
    cat_cluster = state[ids["cat"]]
    assert state[ids["cat-crop"]] == state[ids["cat-q40"]] == cat_cluster
    assert state[ids["coffee"]] == state[ids["coffee-crop"]] != cat_cluster
    assert len({state[ids["astronaut"]], state[ids["rocket"]], cat_cluster, state[ids["coffee"]]}) == 4
    run = cluster.last_run
    assert run is not None and (run.clusters, run.images_clustered, run.largest) == (2, 5, 3)
    # the edges came through Kafka with their geometry: the derivation tree reads it (issue 14)
    assert all(m.geometry is not None for m in cluster.state.matches())
    trees = MemoryTreeStore()
    update_trees(cluster.state, None, trees, [state[ids["coffee"]]])
    coffee_tree = {d.image_id: d for d in trees.get(state[ids["coffee"]])}
    assert coffee_tree[ids["coffee"]].parent is None and coffee_tree[ids["coffee-crop"]].parent == ids["coffee"]
    assert coffee_tree[ids["coffee-crop"]].edit == "crop"

    # published to Milvus, where the API reads: assignments and summaries
    board = cluster.board
    assert board.clusters_of([ids["cat-crop"], ids["coffee"]]) == {ids["cat-crop"]: cat_cluster,
                                                                   ids["coffee"]: state[ids["coffee"]]}
    summary = board.summary(cat_cluster)
    assert summary is not None and (summary.images, summary.posts) == (3, 4)  # cat was posted twice
    assert summary.platforms == {"x": 3, "y": 1}
    # the services run concurrently: the cat edges may land in one reclustering run or two
    events = [h["event"] for h in summary.history]
    assert events[0] == "created" and set(events[1:]) <= {"grew"}, events
    assert board.members([cat_cluster])[cat_cluster] == sorted(ids[n] for n in ("cat", "cat-crop", "cat-q40"))
    reg = cluster.metrics.registry
    assert reg.get_sample_value("memetrace_clusters") == 2
    assert reg.get_sample_value("memetrace_largest_cluster_images") == 3
    assert reg.get_sample_value("memetrace_cluster_size_posts", {"rank": "1", "cluster_id": str(cat_cluster)}) == 4
    assert match.metrics.registry.get_sample_value("memetrace_images_matched_total") == len(posts) - 1

    # redelivery: other groups re-read both topics from the start into the same state
    _, match2, cluster2 = _services(s, embedder, cluster_group=s.kafka_cluster_group_id + "-again",
                                    match_group=s.kafka_match_group_id + "-again")
    _run_all(match2, cluster2)
    assert cluster2.state.clusters() == state
    assert cluster2.last_run is not None and cluster2.last_run.events == []
    again = {(e.a, e.b) for e in (MatchEvent.model_validate_json(r.value)
                                  for r in read_topic(s, s.kafka_matches_topic, 2 * len(edges)))}
    assert again == edges
    replayed = board.summary(cat_cluster)
    assert replayed is not None and (replayed.images, replayed.posts, replayed.platforms) == (3, 4, {"x": 3, "y": 1})
    assert replayed.history == summary.history  # redelivery records no new history


def test_services_starting_together_create_the_collections_once(milvus_server: str, tmp_path: Path) -> None:
    """Every service opens the store at start; the ones that lose the creation race must go on."""
    s = make_settings(tmp_path, milvus_uri=milvus_server, milvus_collection_prefix="race")
    config = MilvusConfig.from_settings(s)

    def open_stores(_: int) -> tuple:
        client = connect(config)  # one client per service, as in production
        return (MilvusVectorIndex(client, config, 8), MilvusOccurrenceLog(client, config),
                MilvusClusterBoard(client, config))

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(open_stores, range(4)))
    assert all(index.count() == 0 and log.count_occurrences() == 0 and board.summaries() == []
               for index, log, board in stores)
    assert stores[0][0].client.has_collection("race_cluster_summaries")


class _MilvusDown(MemoryClusterBoard):
    """A cluster board whose publish fails as a Milvus that is down does."""

    def publish(self, *_: object) -> None:
        raise DependencyDown("milvus", "milvus is down")


def test_cluster_worker_stopped_while_milvus_is_down_records_history_once(tmp_path: Path) -> None:
    """SIGTERM while a reclustering run waits for Milvus: the run and the one on close are abandoned;
    the next start publishes and records the cluster's creation once."""
    s = make_settings(tmp_path)
    state = SqliteGraphState(tmp_path / "state.db")
    state.add_images([(1, 10), (2, 10)])
    state.add_matches([Match(1, 2, 50, "full")])
    worker = ClusterWorker(s, state, _MilvusDown(), ClusterMetrics(CollectorRegistry()), 60.0,
                           consumer=ListConsumer([]))
    worker.stop("SIGTERM")
    with pytest.raises(Abandoned):
        worker.tick()
    worker.close()  # logs the abandoned run, raises nothing
    board = MemoryClusterBoard()  # Milvus is back
    restarted = ClusterWorker(s, state, board, ClusterMetrics(CollectorRegistry()), 60.0, consumer=ListConsumer([]))
    run = restarted.run_once()
    assert [e.event for e in run.events] == ["created"] and board.clusters_of([1, 2]) == state.clusters()
    assert [c.cluster_id for c in board.summaries()] == [state.clusters()[1]]
    assert [h["event"] for h in state.cluster_histories()[state.clusters()[1]]] == ["created"]


def test_local_stack_lets_only_the_ingest_download_from_loopback() -> None:
    """`make stack --demo` serves its images on 127.0.0.1: the ingest must reach them, while the API's
    URL search (reachable by whoever reaches the API) keeps refusing private addresses."""
    from tools.local_stack import _service_env

    allow = "MEMETRACE_FETCH_ALLOW_PRIVATE_NETWORKS"
    assert _service_env("ingest", demo=True)[allow] == "1"
    assert all(allow not in _service_env(name, demo=True) for name in ("match", "cluster", "serve"))
    assert allow not in _service_env("ingest", demo=False)
    assert _service_env("cluster", demo=False) == {"MEMETRACE_METRICS_PORT": "9103"}
