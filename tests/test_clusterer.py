"""clusterer: communities, stable cluster ids across runs, CSV and symlink exports, recluster.

``recluster`` runs on every GraphState backend (the ``graph_state`` fixture) and publishes to a
MemoryClusterBoard or a recording function."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from memetrace.clusterer.export import CSV_COLUMNS, ClusterRow, cluster_rows, write_csv, write_link_dir
from memetrace.clusterer.graph import build_graph, communities, density, stable_ids
from memetrace.clusterer.history import diff
from memetrace.clusterer.service import recluster, summarize
from memetrace.cluster_board import MemoryClusterBoard
from memetrace.clusterer.state import GraphState, MemoryGraphState, Post, PostTotals, SqliteGraphState, add_totals
from memetrace.models import Match


def _m(a: int, b: int, inliers: int = 50) -> Match:
    return Match(a, b, inliers, "full")


def _groups_of(assignment: dict[int, int]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for image, cid in assignment.items():
        out.setdefault(cid, set()).add(image)
    return out


# ----------------------------------------------------------------------------- communities


def test_build_graph_keeps_isolated_images() -> None:
    g = build_graph([1, 2, 3, 4], [_m(1, 2, 30)])
    assert set(g.nodes) == {1, 2, 3, 4}
    assert g.number_of_edges() == 1 and g[1][2]["weight"] == 30.0 and g[1][2]["kind"] == "full"


def test_components() -> None:
    g = build_graph(range(1, 9), [_m(1, 2), _m(2, 3), _m(4, 5), _m(7, 8), _m(8, 7)])
    groups = communities(g, "components")
    assert groups == [{1, 2, 3}, {4, 5}, {7, 8}, {6}]  # biggest first, ties by smallest id
    assert sorted(i for grp in groups for i in grp) == list(range(1, 9))  # every node exactly once


def test_louvain_cuts_a_weak_bridge() -> None:
    clique_a = [_m(a, b, 100) for a in range(1, 6) for b in range(a + 1, 6)]
    clique_b = [_m(a, b, 100) for a in range(6, 11) for b in range(a + 1, 11)]
    g = build_graph(range(1, 12), [*clique_a, *clique_b, _m(5, 6, 10)])
    assert communities(g, "components")[0] == set(range(1, 11))  # one component through the bridge
    louvain = communities(g, "louvain")
    assert louvain[:2] == [{1, 2, 3, 4, 5}, {6, 7, 8, 9, 10}]
    assert louvain[2] == {11}
    assert communities(g, "louvain") == louvain  # seeded: deterministic


def test_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="unknown cluster algorithm"):
        communities(build_graph([1], []), "kmeans")


def test_density() -> None:
    g = build_graph(range(1, 5), [_m(1, 2), _m(2, 3), _m(1, 3), _m(3, 4)])
    assert density(g, {1, 2, 3}) == 1.0
    assert density(g, {1, 2, 3, 4}) == pytest.approx(4 / 6)
    assert density(g, {4}) == 1.0


# ----------------------------------------------------------------------------- stable ids


def test_first_wave_gets_fresh_distinct_ids() -> None:
    ids = stable_ids([{1, 2, 3}, {4, 5}, {6}], {})
    assert ids[1] == ids[2] == ids[3] and ids[4] == ids[5]
    assert len({ids[1], ids[4], ids[6]}) == 3 and min(ids.values()) >= 1


def test_clusters_that_only_grew_keep_their_ids() -> None:
    first = stable_ids([{1, 2, 3}, {4, 5}, {6}], {})
    second = stable_ids(communities(build_graph(range(1, 10), [_m(1, 2), _m(2, 3), _m(3, 7), _m(4, 5), _m(5, 8),
                                                              _m(6, 9)])), first)
    assert second[7] == second[1] == first[1]
    assert second[8] == second[4] == first[4]
    assert second[9] == second[6] == first[6]  # a singleton that gained a copy keeps its id


def test_a_merge_keeps_the_id_of_the_larger_side() -> None:
    first = {1: 10, 2: 10, 3: 10, 4: 20, 5: 20, 6: 30}
    second = stable_ids([{1, 2, 3, 4, 5}, {6}], first)
    assert {second[i] for i in (1, 2, 3, 4, 5)} == {10}
    assert second[6] == 30
    # whatever order the sides are listed in, the larger one wins
    assert stable_ids([{4, 5, 1, 2, 3}], {1: 20, 2: 20, 3: 20, 4: 10, 5: 10})[4] == 20


def test_a_split_keeps_the_id_for_the_larger_part() -> None:
    first = {1: 7, 2: 7, 3: 7, 4: 7, 5: 7, 6: 8}
    second = stable_ids([{1, 2, 3}, {4, 5}, {6}], first)
    assert second[1] == second[2] == second[3] == 7
    assert second[4] == second[5] not in (7, 8)  # the smaller part gets a fresh id
    assert second[4] > max(first.values())
    assert second[6] == 8


def test_new_groups_get_fresh_ids() -> None:
    first = {1: 3, 2: 3, 3: 5}
    second = stable_ids([{1, 2}, {10, 11}, {3}, {12}], first)
    assert second[1] == 3 and second[3] == 5
    fresh = {second[10], second[12]}
    assert second[10] == second[11] and len(fresh) == 2
    assert all(c > 5 for c in fresh)  # never an id some earlier cluster had


def test_two_waves_through_recluster(graph_state: GraphState) -> None:
    published: list[tuple[dict, list, list]] = []
    graph_state.add_images([(i, 100) for i in range(1, 7)])
    graph_state.add_matches([_m(1, 2), _m(2, 3), _m(4, 5)])
    run1 = recluster(graph_state, "components", publish=lambda *a: published.append(a), now=1000)
    first = graph_state.clusters()
    assert run1.clusters == 2 and run1.images_clustered == 5 and run1.largest == 3 and run1.new_clusters == 2
    assert published[0][0] == first  # everything is new, so everything is published
    # wave 2: 7 joins {1,2,3}; {4,5} grows into a bigger group with 8-10; 11-12 are new
    graph_state.add_images([(i, 100) for i in range(7, 13)])
    graph_state.add_matches([_m(3, 7), _m(5, 8), _m(8, 9), _m(9, 10), _m(11, 12)])
    graph_state.add_matches([_m(8, 10)])
    run2 = recluster(graph_state, "components", publish=lambda *a: published.append(a), now=2000)
    second = graph_state.clusters()
    assert second[7] == second[1] == first[1]
    assert second[4] == second[8] == second[10] == first[4]  # only {4,5} had an id: it is kept
    assert second[11] == second[12] and second[11] not in first.values()
    assert second[6] == first[6]
    assert {(e.event, e.cluster_id) for e in run2.events} == {
        ("grew", first[1]), ("grew", first[4]), ("created", second[11])}
    changed, summaries, removed = published[1]
    assert changed == {i: second[i] for i in (7, 8, 9, 10, 11, 12)} and removed == []
    assert {c.cluster_id: c.images for c in summaries} == {first[1]: 4, first[4]: 5, second[11]: 2}
    history = next(c.history for c in summaries if c.cluster_id == first[1])
    assert [(h["at"], h["event"]) for h in history] == [(1000, "created"), (2000, "grew")]
    run3 = recluster(graph_state, "components", now=3000)
    assert graph_state.clusters() == second and run3.events == []  # nothing new: nothing changes
    # wave 3: a bridge merges {1,2,3,7} (4 images) into {4,5,8,9,10} (5): the larger keeps its id
    graph_state.add_matches([_m(7, 8)])
    published.clear()
    run4 = recluster(graph_state, "components", publish=lambda *a: published.append(a), now=4000)
    third = graph_state.clusters()
    assert third[1] == third[4] == first[4]
    assert [(e.event, e.cluster_id, e.clusters) for e in run4.events] == [
        ("merged", first[4], tuple(sorted((first[1], first[4]))))]
    assert published[0][2] == [first[1]]  # the absorbed cluster's summary is removed


def test_history_of_a_split_keeps_the_id_with_the_larger_part() -> None:
    previous = {1: 7, 2: 7, 3: 7, 4: 7, 5: 7}
    current = stable_ids([{1, 2, 3}, {4, 5}], previous)
    assert current[1] == 7 and current[4] not in (7,)
    events = {(e.event, e.cluster_id, e.clusters) for e in diff(previous, current)}
    assert events == {("created", current[4], (7,)), ("split", 7, (7, current[4]))}  # one event each, no "shrank"


def test_history_of_a_cluster_made_of_parts_of_two() -> None:
    previous = {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2}
    current = stable_ids([{1, 2}, {4, 5}, {3, 6}], previous)
    new = current[3]
    assert new not in (1, 2)
    assert [(e.event, e.cluster_id, e.clusters) for e in diff(previous, current)] == [
        ("created", new, (1, 2)), ("split", 1, (1, new)), ("split", 2, (2, new))]  # created, not merged


def test_history_of_a_dissolved_cluster() -> None:
    assert [(e.event, e.cluster_id) for e in diff({1: 3, 2: 3}, {1: 3, 2: 4})] == [("dissolved", 3)]


def test_a_failed_publish_records_no_history(graph_state: GraphState) -> None:
    """A run whose publish fails (Milvus down, or SIGTERM while retrying) is redone by the next one:
    its events must be recorded once, by the run that succeeds."""

    def down(*_: object) -> None:
        raise ConnectionError("milvus down")

    graph_state.add_images([(1, 10), (2, 10)])
    graph_state.add_matches([_m(1, 2)])
    for _ in range(2):
        with pytest.raises(ConnectionError):
            recluster(graph_state, "components", publish=down, now=1000)
    assert graph_state.clusters() == {}
    published: list[tuple[dict, list, list]] = []
    run = recluster(graph_state, "components", publish=lambda *a: published.append(a), now=1100)
    cid = graph_state.clusters()[1]
    expected = [{"at": 1100, "event": "created", "clusters": []}]
    assert published[0][1][0].history == expected  # this run's event is in what it publishes
    assert graph_state.cluster_histories() == {cid: expected} and [e.event for e in run.events] == ["created"]


def test_a_post_dated_in_the_future_counts_when_seen(graph_state: GraphState) -> None:
    now = time.time()
    graph_state.add_images([(1, 10), (2, 10)])
    graph_state.add_matches([_m(1, 2)])
    graph_state.add_posts([("p1", 1, int(now) - 3 * 86400, "x"), ("p2", 2, int(now) + 50 * 365 * 86400, "x")])
    (c,) = recluster(graph_state, "components", now=now + 30 * 86400).summaries  # a month later
    assert (c.growth_hour, c.growth_day) == (0, 0)
    assert c.last_seen <= now + 1


def test_summaries_count_posts_files_growth_and_platforms(graph_state: GraphState) -> None:
    now = 1_000_000
    graph_state.add_images([(1, 10), (2, 10), (3, 10)])
    graph_state.add_matches([_m(1, 2)])
    graph_state.add_posts([("p1", 1, now - 30, "x"), ("p2", 2, now - 7200, "x"), ("p3", 2, now - 200_000, "y"),
                       ("p4", 3, now - 10, "x")])
    graph_state.add_posts([("p1", 1, now - 5, "z")])  # redelivered: the first row stays
    run = recluster(graph_state, "components", now=now)
    (c,) = run.summaries
    assert (c.images, c.posts, c.first_seen, c.last_seen) == (2, 3, now - 200_000, now - 30)
    assert (c.growth_hour, c.growth_day, c.platforms) == (1, 2, {"x": 2, "y": 1})


def test_recluster_publishes_what_the_api_reads_on_the_board(graph_state: GraphState) -> None:
    board = MemoryClusterBoard()
    graph_state.add_images([(i, 10) for i in range(1, 6)])
    graph_state.add_matches([_m(1, 2), _m(3, 4), _m(4, 5)])
    graph_state.add_posts([("p1", 1, 100, "x"), ("p2", 3, 200, "y")])
    recluster(graph_state, "components", publish=board.publish, now=1000)
    first = graph_state.clusters()
    a, b = first[1], first[3]
    assert board.clusters_of([1, 2, 3, 4, 5]) == first and board.members([a]) == {a: [1, 2]}
    assert (board.summary(a).posts, board.summary(a).platforms) == (1, {"x": 1})
    graph_state.add_matches([_m(2, 3)])  # {1,2} merges into {3,4,5}: the larger keeps its id
    recluster(graph_state, "components", publish=board.publish, now=2000)
    assert board.clusters_of([1, 2, 3, 4, 5]) == dict.fromkeys(range(1, 6), b) == graph_state.clusters()
    assert board.summary(a) is None  # absorbed: its summary is gone
    summary = board.summary(b)
    assert [(h["at"], h["event"], h["clusters"]) for h in summary.history] == [
        (1000, "created", []), (2000, "merged", sorted([a, b]))]
    assert (summary.images, summary.posts, summary.platforms) == (5, 2, {"x": 1, "y": 1})


class _RecordingState(MemoryGraphState):
    def __init__(self) -> None:
        super().__init__()
        self.saved: list[dict[int, int]] = []

    def save_run(self, changed, at, events=(), **kw) -> None:  # type: ignore[no-untyped-def]
        self.saved.append(dict(changed))
        super().save_run(changed, at, events, **kw)


def test_recluster_saves_only_the_assignments_that_changed() -> None:
    state = _RecordingState()
    state.add_images([(i, 10) for i in range(1, 5)])
    state.add_matches([_m(1, 2)])
    recluster(state, "components", now=1000)
    state.add_matches([_m(2, 3)])
    recluster(state, "components", now=2000)
    recluster(state, "components", now=3000)
    first, second, third = state.saved
    assert set(first) == {1, 2, 3, 4}  # the first run assigns every image
    assert second == {3: state.clusters()[1]} and third == {}  # later ones write only what moved


def test_a_restarted_state_keeps_ids_and_history(tmp_path: Path) -> None:
    state = SqliteGraphState(tmp_path / "state.db")
    state.add_images([(1, 10), (2, 10), (3, 10)])
    state.add_matches([_m(1, 2)])
    recluster(state, "components", now=1000)
    before = state.clusters()
    state.close()
    again = SqliteGraphState(tmp_path / "state.db")
    try:
        again.add_matches([_m(2, 3)])
        run = recluster(again, "components", now=2000)
        assert again.clusters() == dict.fromkeys((1, 2, 3), before[1])
        assert [(e.event, e.cluster_id) for e in run.events] == [("grew", before[1])]
        assert [h["event"] for h in again.cluster_histories()[before[1]]] == ["created", "grew"]
    finally:
        again.close()


# ----------------------------------------------------------------------------- exports


@pytest.fixture()
def rows() -> list[ClusterRow]:
    g = build_graph([1, 2, 3, 4, 5], [_m(1, 2), _m(2, 3), _m(4, 5)])
    assignment = {1: 10, 2: 10, 3: 10, 4: 20, 5: 20}
    # image 1 is two files (exact duplicates); image 5 has no path (not shown)
    paths = {1: ["a/one.jpg", "b/one_again.jpg"], 2: ["two.png"], 3: ["three.jpg"], 4: ["four.jpg"]}
    nb_points = {1: 300, 2: 250, 3: 120, 4: 90, 5: 80}
    return cluster_rows(g, assignment, paths, nb_points)


def test_cluster_rows(rows: list[ClusterRow]) -> None:
    assert [r.path for r in rows] == ["a/one.jpg", "b/one_again.jpg", "two.png", "three.jpg", "four.jpg"]
    by_path = {r.path: r for r in rows}
    assert by_path["a/one.jpg"] == ClusterRow("a/one.jpg", 1, 300, 1, 10, round(2 / 3, 4))
    assert by_path["two.png"].degree == 2 and by_path["two.png"].cluster_id == 10
    assert by_path["four.jpg"] == ClusterRow("four.jpg", 4, 90, 1, 20, 1.0)


def test_write_csv(tmp_path: Path, rows: list[ClusterRow]) -> None:
    out = tmp_path / "sub" / "clusters.csv"
    write_csv(rows, out)
    with out.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    assert header == ["path", "image_id", "nb_points", "degree", "cluster_id", "quality"] == CSV_COLUMNS
    assert len(body) == len(rows) == 5
    assert [r[0] for r in body] == [r.path for r in rows]  # one row per path
    assert body[0] == ["a/one.jpg", "1", "300", "1", "10", "0.6667"]


def test_write_link_dir(tmp_path: Path, rows: list[ClusterRow]) -> None:
    root = tmp_path / "corpus"
    for r in rows:
        (root / r.path).parent.mkdir(parents=True, exist_ok=True)
        (root / r.path).write_bytes(r.path.encode())
    out = tmp_path / "links"
    assert write_link_dir(rows, root, out) == 1
    folder = out / "cluster_10"
    links = sorted(p.name for p in folder.iterdir())
    assert links == ["a__one.jpg", "b__one_again.jpg", "three.jpg", "two.png"]
    for p in folder.iterdir():
        assert p.is_symlink() and p.resolve().is_file()
        assert p.read_bytes() == p.resolve().relative_to(root.resolve()).as_posix().encode()
    # only one file shows image 4's cluster: below min_size, no folder
    assert not (out / "cluster_20").exists()
    assert write_link_dir(rows, root, out, min_size=1) == 2  # rerun: links replaced, not an error
    assert (out / "cluster_20" / "four.jpg").resolve() == (root / "four.jpg").resolve()


def test_write_link_dir_keeps_absolute_paths(tmp_path: Path) -> None:
    target = tmp_path / "abs.jpg"
    target.write_bytes(b"x")
    rows = [ClusterRow(str(target), 1, 10, 1, 4, 1.0), ClusterRow("rel.jpg", 2, 10, 1, 4, 1.0)]
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "rel.jpg").write_bytes(b"y")
    assert write_link_dir(rows, tmp_path / "root", tmp_path / "links") == 1
    names = {p.name: p for p in (tmp_path / "links" / "cluster_4").iterdir()}
    link = names[str(target).replace("/", "__")]
    assert os.readlink(link) == str(target) and link.read_bytes() == b"x"
    assert names["rel.jpg"].read_bytes() == b"y"


# ----------------------------------------------------------------------------- incremental runs


Batch = tuple[list[tuple[int, int]], list[Match], list[int], list[Post]]  # images, edges, removed images, posts
T = 10**6  # the replay's run k happens at T + k * RUN_S
RUN_S = 1800


def _posts(images: list[int], rng, batches: int) -> list[list[Post]]:
    """One to three posts per image (of ``images`` in arrival order, spread over ``batches`` runs),
    dated up to a day and a half before their run: some in its last hour or day, some older; a
    post may come one run before its image, or a few runs after it."""
    out: list[list[Post]] = [[] for _ in range(batches)]
    per_run = max(1, len(images) // batches)
    for k, image in enumerate(images):
        for n in range(rng.randint(1, 3)):
            run = min(batches - 1, max(0, k // per_run + rng.choice([-1, 0, 0, 0, 2, 5])))
            posted = T + run * RUN_S - rng.randint(0, 130_000)
            out[run].append((f"p{image}-{n}", image, posted, rng.choice(["x", "telegram", "reddit"])))
    return out


def _dev_split_batches(run_size: int = 40, seed: int = 0) -> tuple[list[Batch], int]:
    """The benchmark's dev split graph (tests/data/dev_edges.json.gz) arriving in small runs, in a
    shuffled order; a tenth of the edges come before their second image (held back until it does)."""
    import gzip
    import json
    import random

    data = json.loads(gzip.decompress((Path(__file__).parent / "data" / "dev_edges.json.gz").read_bytes()))
    rng = random.Random(seed)
    order = list(range(1, data["images"] + 1))
    rng.shuffle(order)
    at = {image: k for k, image in enumerate(order)}
    batches: list[Batch] = [([], [], [], []) for _ in range(0, len(order), run_size)]
    for k, image in enumerate(order):
        batches[k // run_size][0].append((image, 100))
    for a, b, inliers, kind in data["edges"]:
        early = rng.random() < 0.1
        arrives = min(at[a], at[b]) if early else max(at[a], at[b])
        batches[arrives // run_size][1].append(Match(a, b, inliers, {"f": "full", "p": "partial"}[kind]))
    for batch, posts in zip(batches, _posts(order, rng, len(batches))):
        batch[3].extend(posts)
    return batches, len(order)


def _generated_batches(n: int, seed: int, removals: bool) -> list[Batch]:
    """A stream of benchmarks.scale (singletons, heavy-tailed clusters, bursts, bridges) in runs of
    10..150 images, with a few images removed now and then."""
    import random

    from benchmarks.scale import generate

    stream = generate(n, seed)
    rng = random.Random(seed)
    batches: list[Batch] = []
    lo = 0
    while lo < n:
        hi = min(n, lo + rng.randint(10, 150))
        gone = rng.sample([int(i) for i in stream.image_ids[:lo]], 3) if removals and lo and rng.random() < 0.3 else []
        batches.append((stream.images(lo, hi), stream.matches(lo, hi), gone, []))
        lo = hi
    for batch, posts in zip(batches, _posts([int(i) for i in stream.image_ids], rng, len(batches))):
        batch[3].extend(posts)
    return batches


def _sizes(assignment: dict[int, int]) -> dict[int, int]:
    return {c: len(images) for c, images in _groups_of(assignment).items()}


def _replay(state: GraphState, batches: list[Batch], algorithm: str,
            reopen: Callable[[GraphState], GraphState] | None = None) -> GraphState:
    """Feed each batch and recluster it incrementally; after each run, the state's clusters, ids and
    events equal a full recomputation from scratch (graph.py's communities and stable_ids over every
    image and edge), whose previous assignment and id counter are its own, and so do the summaries
    of the clusters it recomputed and the post totals it keeps of every cluster (from every post)."""
    reference: dict[int, int] = {}
    next_id = 1
    for k, (images, edges, gone, posts) in enumerate(batches):
        state.add_images(images)
        state.add_matches(edges)
        state.add_posts(posts)
        state.remove_images(gone)
        now = T + k * RUN_S
        run = recluster(state, algorithm, now=now)
        alive = state.images()
        full = stable_ids(communities(build_graph(alive, state.matches()), algorithm), reference, next_id)
        assert state.clusters() == full, f"run {k}"
        assert run.events == diff(reference, full), f"run {k}"
        sizes = {c: n for c, n in _sizes(full).items() if n > 1}
        rows = [(full[r.image_id], *r[1:]) for r in state.occurrence_stats(now) if full.get(r.image_id) in sizes]
        expected = summarize(state, {c: sizes[c] for c in run.touched if c in sizes}, rows, now)  # events saved
        assert run.summaries == expected, f"run {k}"
        assert state.cluster_posts(sizes) == add_totals(PostTotals(*r[:5]) for r in rows), f"run {k}"
        reference, next_id = full, max([next_id, *(c + 1 for c in full.values())])
        if reopen is not None and k % 5 == 4:
            state = reopen(state)
    assert len(set(reference.values())) < len(reference)  # clusters formed, not only singletons
    return state


@pytest.mark.parametrize("algorithm", ["components", "louvain"])
def test_incremental_runs_equal_a_full_recomputation_on_the_dev_split(graph_state: GraphState, algorithm: str) -> None:
    batches, n = _dev_split_batches()
    _replay(graph_state, batches, algorithm)
    assert len(graph_state.images()) == n and graph_state.pending().images == set()


@pytest.mark.parametrize(("algorithm", "n"), [("components", 1500), ("louvain", 800)])
def test_incremental_runs_equal_a_full_recomputation_on_a_generated_stream(graph_state: GraphState, algorithm: str,
                                                                           n: int) -> None:
    _replay(graph_state, _generated_batches(n, seed=3, removals=True), algorithm)


def test_a_restarted_state_resumes_incrementally(tmp_path: Path) -> None:
    """Closed and reopened every five runs: each run goes on from the stored labels, clusters and
    change log, and still equals a full recomputation."""
    def reopen(state: GraphState) -> GraphState:
        state.close()
        return SqliteGraphState(tmp_path / "state.db")

    _replay(SqliteGraphState(tmp_path / "state.db"), _generated_batches(1500, seed=5, removals=True),
            "components", reopen).close()


def test_a_run_recomputes_only_the_components_that_changed(graph_state: GraphState) -> None:
    published: list[tuple[dict, list, list]] = []
    graph_state.add_images([(i, 10) for i in range(1, 10)])
    graph_state.add_matches([_m(1, 2), _m(2, 3), _m(4, 5), _m(6, 7)])
    first = recluster(graph_state, "components", now=1000)
    assert first.images_touched == 9 and graph_state.pending().images == set()
    graph_state.add_matches([_m(1, 2)])  # redelivered, unchanged: nothing to do
    assert recluster(graph_state, "components", now=1500).images_touched == 0
    graph_state.add_matches([_m(2, 3, 60)])  # a changed edge in {1,2,3}
    graph_state.add_posts([("p", 6, 100, "x")])  # a new post of {6,7}
    run = recluster(graph_state, "components", publish=lambda *a: published.append(a), now=2000)
    clusters = graph_state.clusters()
    assert run.images_touched == 5 and run.touched == sorted({clusters[1], clusters[6]})
    assert [c.cluster_id for c in published[0][1]] == run.touched and published[0][0] == {}
    assert (run.clusters, run.images_clustered, run.largest) == (3, 7, 3)  # totals of the whole state


def test_an_edge_held_back_joins_when_its_image_arrives(graph_state: GraphState) -> None:
    graph_state.add_images([(1, 10), (2, 10)])
    graph_state.add_matches([_m(1, 2), _m(2, 3)])  # 3 is not an image yet
    recluster(graph_state, "components", now=1000)
    assert 3 not in graph_state.clusters()
    graph_state.add_images([(3, 10)])  # its edge was stored before: the run must find it
    recluster(graph_state, "components", now=2000)
    clusters = graph_state.clusters()
    assert clusters[3] == clusters[1] == clusters[2]


def test_removing_an_image_splits_its_component(graph_state: GraphState) -> None:
    graph_state.add_images([(i, 10) for i in range(1, 8)])
    graph_state.add_matches([_m(1, 2), _m(2, 3), _m(3, 4), _m(4, 5), _m(6, 7)])
    graph_state.add_posts([("p3", 3, 100, "x")])
    recluster(graph_state, "components", now=1000)
    c = graph_state.clusters()[1]
    graph_state.remove_images([3])
    assert graph_state.pending().images >= {1, 2, 3, 4, 5} and 3 not in graph_state.images()
    assert graph_state.edges_of([3]) == [] and graph_state.occurrence_stats(0, [3]) == []
    assert {(m.a, m.b) for m in graph_state.edges_of([2, 4])} == {(1, 2), (4, 5)}
    run = recluster(graph_state, "components", now=2000)
    after = graph_state.clusters()
    assert 3 not in after and after[1] == after[2] == c  # a tie: the smaller ids keep it
    assert after[4] == after[5] != c and run.images_touched == 4
    assert [(e.event, e.cluster_id) for e in run.events] == [("created", after[4]), ("split", c)]


def test_a_full_run_after_incremental_ones_changes_nothing_and_publishes_everything(graph_state: GraphState) -> None:
    for images, edges, _, _ in _generated_batches(600, seed=1, removals=False):
        graph_state.add_images(images)
        graph_state.add_matches(edges)
        recluster(graph_state, "components", now=1000)
    published: list[tuple[dict, list, list]] = []
    before = graph_state.clusters()
    run = recluster(graph_state, "components", publish=lambda *a: published.append(a), now=2000, full=True)
    assert graph_state.clusters() == before and run.events == []
    assert published[0][0] == before and len(published[0][1]) == run.clusters


def test_ids_are_never_reused(graph_state: GraphState) -> None:
    """The highest id merged away is not handed out again (its history would be inherited)."""
    graph_state.add_images([(i, 10) for i in range(1, 6)])
    graph_state.add_matches([_m(1, 2), _m(2, 3), _m(4, 5)])
    recluster(graph_state, "components", now=1000)
    first = graph_state.clusters()
    graph_state.add_matches([_m(3, 4)])  # {4,5} merges into {1,2,3}
    recluster(graph_state, "components", now=2000)
    graph_state.add_images([(6, 10), (7, 10)])
    graph_state.add_matches([_m(6, 7)])
    recluster(graph_state, "components", now=3000)
    assert graph_state.clusters()[6] not in set(first.values())


def test_the_generated_stream_has_the_shapes_it_claims() -> None:
    """benchmarks.scale: mostly singletons, a heavy tail, ~5 edges per image, copies' vectors near
    one base (the query side's synthetic neighbours)."""
    import numpy as np

    from benchmarks.scale import generate, near_vectors

    stream = generate(5000, seed=2)
    sizes = np.bincount(stream.cluster[stream.cluster >= 0])
    assert 0.65 < (stream.cluster < 0).mean() < 0.75 and sizes.max() > 20 * np.median(sizes)
    assert 4 < len(stream.edges) / 5000 < 6 and (np.diff(stream.arrival) >= 0).all()
    real = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    v = near_vectors(stream, real, copy_distance=0.2, far_distance=1.0)
    big = int(np.argmax(sizes))
    copies = v[stream.cluster == big]
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.linalg.norm(copies - copies.mean(axis=0), axis=1).mean() < 0.3
