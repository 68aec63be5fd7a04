"""The streaming services give the same derivation trees as the folder run (issue 14), on a few
trees of the benchmark's propagation set (make_propagation.py, dev split; generated into the
benchmark cache unless cached there):

* folder: ``index images/ --posts posts.csv`` on the trees' files, then ``memetrace tree``'s rows;
* streaming: the same posts from ``posts.jsonl`` through Kafka (Tansu), the images served over
  HTTP on 127.0.0.1, through the ingest, match and cluster services, the cluster service redoing
  the trees of the clusters each run touched (as ``memetrace cluster`` wires it).

Skipped without the benchmark folder or AugLy. Slow: two small runs (26 images), 1-4 min on 2 cores.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from kafka_broker import Broker, kafka_broker  # noqa: F401
from prometheus_client import CollectorRegistry
from streaming import (PhotoServer, ingest_env, milvus_server, photo_server, produce,  # noqa: F401
                       settings_from, write_posts)
from test_services import _run_all

from memetrace.cli.batch import run_index
from memetrace.cli.context import Context
from memetrace.cli.posts import tree_table
from memetrace.cli.services import ingest_worker
from memetrace.clusterer.metrics import ClusterMetrics
from memetrace.clusterer.service import ClusterRun
from memetrace.clusterer.state import SqliteGraphState
from memetrace.clusterer.tree_update import update_trees
from memetrace.clusterer.worker import ClusterWorker
from memetrace.imageio import content_id
from memetrace.ingest.metrics import IngestMetrics
from memetrace.kafka_clients import ensure_topics
from memetrace.matcher.matching import MatchConfig, Matcher
from memetrace.matcher.metrics import MatchMetrics
from memetrace.matcher.worker import MatchWorker
from memetrace.tree_store import MemoryTreeStore

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(_REPO))

from benchmarks.propagation import generate  # noqa: E402
from benchmarks.run import DEFAULT_CACHE, bench_dir, bench_unavailable, split_dir  # noqa: E402

pytestmark = pytest.mark.slow
TREES = 3  # trees of the set run (the first group ids): ~30 images
IDLE_S = 20  # a service stops after this long without a message: the ingest of a loaded machine is slow


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the first TREES trees of the set: images/, posts.csv, posts.jsonl."""
    reason = bench_unavailable()
    if reason:
        pytest.skip(reason)
    bench = bench_dir()
    generated, _ = generate(bench, split_dir(bench, "dev"), DEFAULT_CACHE / "generated-propagation" / "dev")
    with (generated / "propagation.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    groups = sorted({r["group_id"] for r in rows})[:TREES]
    paths = {r["path"] for r in rows if r["group_id"] in groups}
    out = tmp_path_factory.mktemp("trees")
    (out / "images").mkdir()
    for p in sorted(paths):
        shutil.copyfile(generated / p, out / p)
    with (generated / "posts.csv").open() as fh, (out / "posts.csv").open("w", newline="") as dst:
        reader = csv.DictReader(fh)
        writer = csv.DictWriter(dst, reader.fieldnames or [])
        writer.writeheader()
        writer.writerows(r for r in reader if r["path"] in paths)
    posts = [json.loads(line) for line in (generated / "posts.jsonl").read_text().splitlines() if line.strip()]
    write_posts(out / "posts.jsonl", [p for p in posts if p["path"] in paths])
    return out


def _folder_trees(folder: Path, tmp: Path, env: dict[str, str], embedder) -> dict[str, str]:
    s = settings_from({**env, "MEMETRACE_DATA_DIR": str(tmp / "folder-data"), "MEMETRACE_MILVUS_URI": ""})
    c = Context(s, embedder=embedder)
    try:
        run_index(c, folder / "images", folder / "posts.csv", show_progress=False)
        return {Path(r.path).name: Path(r.parent_path).name if r.parent_path else "" for r in tree_table(c)}
    finally:
        c.close()


def _stream_trees(folder: Path, tmp: Path, env: dict[str, str], server: PhotoServer, embedder) -> dict[str, str]:
    s = settings_from(env)
    ensure_topics(s, [s.kafka_images_topic, s.kafka_matches_topic, s.kafka_deadletter_topic])
    names = {}
    for f in sorted((folder / "images").iterdir()):
        server.jpegs[f.name] = f.read_bytes()
        names[content_id(server.jpegs[f.name])] = f.name
    posts = [json.loads(line) for line in (folder / "posts.jsonl").read_text().splitlines()]
    produce(env, write_posts(tmp / "posts.txt", [{**p, "url": f"{server.base}/img/{Path(p['path']).name}"}
                                                 for p in posts]))
    ctx = Context(s, embedder=embedder)
    trees = MemoryTreeStore()
    state = SqliteGraphState(s.data_dir / "cluster-state.db")

    def redo_trees(run: ClusterRun) -> None:  # as memetrace.cli.services.run_cluster wires it
        update_trees(state, ctx.features, trees, run.touched, verify=ctx.verify_pairs, cache=ctx.tree_edges)

    _run_all(ingest_worker(ctx, IngestMetrics(CollectorRegistry())),
             MatchWorker(s, Matcher(MatchConfig.from_settings(s), ctx.index, ctx.features),
                         MatchMetrics(CollectorRegistry())),
             ClusterWorker(s, state, ctx.board, ClusterMetrics(CollectorRegistry()), every_s=1.0,
                           after_run=redo_trees), idle_s=IDLE_S, limit_s=600)
    return {names[d.image_id]: names[d.parent] if d.parent is not None else ""
            for cid in trees.cluster_ids() for d in trees.get(cid)}


def test_streaming_run_gives_the_folder_run_trees(subset: Path, kafka_broker: Broker,  # noqa: F811
                                                   photo_server: PhotoServer, milvus_server: str,  # noqa: F811
                                                   embedder, tmp_path: Path) -> None:
    env = ingest_env(tmp_path, kafka_broker, MEMETRACE_MILVUS_URI=milvus_server, MEMETRACE_REGIONS="1")
    env.update({"MEMETRACE_KAFKA_MATCHES_TOPIC": env["MEMETRACE_KAFKA_IMAGES_TOPIC"] + "-matches",
                "MEMETRACE_KAFKA_MATCH_GROUP_ID": env["MEMETRACE_KAFKA_INGEST_GROUP_ID"] + "-match",
                "MEMETRACE_KAFKA_CLUSTER_GROUP_ID": env["MEMETRACE_KAFKA_INGEST_GROUP_ID"] + "-cluster"})
    folder = _folder_trees(subset, tmp_path, env, embedder)
    stream = _stream_trees(subset, tmp_path, env, photo_server, embedder)
    assert len(folder) >= 2 * TREES and sum(bool(p) for p in folder.values()) >= len(folder) - 2 * TREES
    differ = {n: (folder.get(n), stream.get(n)) for n in folder.keys() | stream.keys() if folder.get(n) != stream.get(n)}
    print(f"\ntrees: {len(folder)} images in the folder run, {len(stream)} streamed, {len(differ)} differ")
    assert not differ, differ
