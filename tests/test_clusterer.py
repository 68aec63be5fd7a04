"""clusterer: communities, stable cluster ids across runs, CSV and symlink exports, recluster.

``recluster`` runs on every GraphState backend (the ``graph_state`` fixture) and publishes to a
MemoryClusterBoard or a recording function."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest

from memetrace.clusterer.export import CSV_COLUMNS, ClusterRow, cluster_rows, write_csv, write_link_dir
from memetrace.clusterer.graph import build_graph, communities, density, stable_ids
from memetrace.clusterer.history import diff
from memetrace.clusterer.service import recluster
from memetrace.cluster_board import MemoryClusterBoard
from memetrace.clusterer.state import GraphState, MemoryGraphState, SqliteGraphState
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
    assert run.fastest_growing(5) == [c]


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

    def save_run(self, changed, at, events=()) -> None:  # type: ignore[no-untyped-def]
        self.saved.append(dict(changed))
        super().save_run(changed, at, events)


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
