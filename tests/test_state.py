"""The SQLite-or-memory stores each owner keeps: one contract per interface, run on every backend.

- the clusterer's GraphState (``graph_state`` fixture: SqliteGraphState, MemoryGraphState);
- the batch pipeline's BatchCatalog (SqliteBatchCatalog, MemoryBatchCatalog);
- the file format check: an old or foreign file is refused in one line that says what to do;
- the batch pipeline feeding the clusterer's state.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_pipeline import invoke

from memetrace.cli.batch import feed, to_match
from memetrace.errors import DependencyDown, StorageDenied
from memetrace.cli.catalog import BatchCatalog, MemoryBatchCatalog, SqliteBatchCatalog
from memetrace.clusterer.state import GraphState, MemoryGraphState, OccurrenceStats, SqliteGraphState
from memetrace.models import Match
from memetrace.settings import Settings
from memetrace.sqlite_file import IncompatibleFile

# ----------------------------------------------------------------------------- GraphState


def test_state_images_keep_their_first_row(graph_state: GraphState) -> None:
    graph_state.add_images([(1, 100), (2, 200)])
    graph_state.add_images([(1, 999), (3, 5)])  # redelivered 1: unchanged
    assert graph_state.images() == {1: 100, 2: 200, 3: 5}


def test_state_matches_are_keyed_by_pair(graph_state: GraphState) -> None:
    graph_state.add_matches([Match(5, 2, 40, "full"), Match(2, 9, 12, "partial")])
    graph_state.add_matches([Match(2, 5, 41, "full")])  # same pair, other order: replaced
    assert sorted(graph_state.matches(), key=lambda m: (m.a, m.b)) == [Match(2, 5, 41, "full"),
                                                                       Match(2, 9, 12, "partial")]


def test_state_save_run_sets_the_changed_images_and_keeps_the_others(graph_state: GraphState) -> None:
    graph_state.save_run({1: 10, 2: 10, 3: 11}, 1)
    graph_state.save_run({1: 12, 4: 12}, 2)
    assert graph_state.clusters() == {1: 12, 2: 10, 3: 11, 4: 12}


def test_state_save_run_is_all_or_nothing(graph_state: GraphState) -> None:
    def events() -> Iterator[tuple[str, int, tuple[int, ...]]]:
        yield "created", 10, ()
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        graph_state.save_run({1: 10, 2: 10}, 1, events())
    assert graph_state.clusters() == {} and graph_state.cluster_histories() == {}


def test_state_cluster_histories_keep_the_latest_events_of_each_cluster(graph_state: GraphState) -> None:
    graph_state.save_run({}, 1, [("created", 1, ()), ("created", 2, ())])
    graph_state.save_run({}, 2, [("grew", 1, ())])
    graph_state.save_run({}, 3, [("merged", 1, (1, 3))])
    assert graph_state.cluster_histories(limit=2) == {
        1: [{"at": 2, "event": "grew", "clusters": []}, {"at": 3, "event": "merged", "clusters": [1, 3]}],
        2: [{"at": 1, "event": "created", "clusters": []}]}


def test_state_occurrence_stats(graph_state: GraphState) -> None:
    now, seen = 1_000_000, int(time.time())  # posted long before they were seen
    graph_state.add_posts([("p1", 1, now - 30, "x"), ("p2", 1, now - 7200, "x"), ("p3", 1, now - 200_000, "y"),
                           ("p4", 2, -1, "file")])
    graph_state.add_posts([("p1", 1, now - 5, "z")])  # redelivered: the first row stays
    got = {(r.image_id, r.platform): r for r in graph_state.occurrence_stats(now)}
    assert got[1, "x"] == OccurrenceStats(1, "x", 2, now - 7200, now - 30, 1, 2)
    assert got[1, "y"] == OccurrenceStats(1, "y", 1, now - 200_000, now - 200_000, 0, 0)
    file = got[2, "file"]  # no posting time: when the state first saw it
    assert file.posts == 1 and seen <= file.first == file.last <= time.time()
    assert set(got) == {(1, "x"), (1, "y"), (2, "file")}


def test_state_counts(graph_state: GraphState) -> None:
    assert graph_state.counts() == {"images": 0, "matches": 0, "clusters": 0}
    graph_state.add_images([(i, 10) for i in range(1, 7)])
    graph_state.add_matches([Match(1, 2, 10, "full"), Match(2, 3, 10, "full"), Match(4, 5, 10, "full")])
    graph_state.save_run({1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3}, 1)  # 6 is alone: not a cluster
    assert graph_state.counts() == {"images": 6, "matches": 3, "clusters": 2}


def test_state_change_log_records_what_changed_and_a_run_clears_it(graph_state: GraphState) -> None:
    assert graph_state.pending() == (0, set(), set(), set(), set())
    graph_state.add_images([(1, 10), (2, 10)])
    graph_state.add_matches([Match(2, 3, 30, "full")])
    graph_state.add_posts([("p", 4, 5, "x")])
    cursor, touched, _, edges, posts = graph_state.pending()
    assert edges == {(2, 3)}
    assert touched == {1, 2, 3, 4}
    assert [(t.key, t.platform, t.posts) for t in graph_state.post_totals(posts)] == [(4, "x", 1)]
    graph_state.add_images([(1, 99)])  # redelivered: no change
    graph_state.add_matches([Match(3, 2, 30, "full")])
    graph_state.add_posts([("p", 4, 5, "x")])
    assert graph_state.pending()[:2] == (cursor, touched)
    graph_state.add_matches([Match(2, 3, 31, "full")])  # changed: both ends again
    later = graph_state.pending().cursor
    assert later > cursor
    graph_state.save_run({}, 1, cursor=cursor)  # a run that read up to ``cursor``
    assert graph_state.pending()[:2] == (later, {2, 3})


def test_state_reads_by_image(graph_state: GraphState) -> None:
    graph_state.add_images([(i, 10) for i in range(1, 6)])
    graph_state.add_matches([Match(1, 2, 30, "full"), Match(2, 3, 30, "full"), Match(4, 9, 30, "full")])
    graph_state.save_run({1: 7, 2: 7, 3: 7, 4: 8}, 1, components={1: 5, 2: 5, 3: 5, 4: 6})
    assert graph_state.known([1, 4, 9]) == {1, 4}
    assert sorted((m.a, m.b) for m in graph_state.edges_of([2, 9])) == [(1, 2), (2, 3), (4, 9)]
    assert graph_state.clusters_of([1, 4, 5]) == {1: 7, 4: 8}
    assert graph_state.components_of([1, 4, 5]) == {1: 5, 4: 6}
    assert graph_state.component_members([5]) == {1: 5, 2: 5, 3: 5}
    graph_state.save_run({4: 7}, 2, components={4: 5, 1: None}, dropped=[3])  # 1 now alone, 3 unassigned
    assert graph_state.clusters() == {1: 7, 2: 7, 4: 7} and graph_state.component_members([5, 6]) == {2: 5, 3: 5, 4: 5}


def test_state_counters_and_totals_follow_the_saved_runs(graph_state: GraphState) -> None:
    assert graph_state.next_ids() == (1, 1) and graph_state.totals() == (0, 0, 0)
    graph_state.save_run({1: 4, 2: 4, 3: 4, 5: 2, 6: 2, 7: 9}, 1, components={1: 3, 2: 3})
    assert graph_state.next_ids() == (10, 4) and graph_state.totals() == (2, 5, 3)
    graph_state.save_run({5: 4}, 2, dropped=[6, 7])  # 2 and 9 are gone; their ids stay used
    assert graph_state.next_ids() == (10, 4) and graph_state.totals() == (1, 4, 4)
    assert graph_state.counts()["clusters"] == 1


def test_state_remove_images_forgets_them_and_logs_their_components(graph_state: GraphState) -> None:
    graph_state.add_images([(i, 10) for i in range(1, 6)])
    graph_state.add_matches([Match(1, 2, 30, "full"), Match(2, 3, 30, "full")])
    graph_state.add_posts([("p2", 2, 5, "x"), ("p4", 4, 5, "x")])
    graph_state.save_run({}, 1, components={1: 1, 2: 1, 3: 1}, cursor=graph_state.pending().cursor)
    graph_state.remove_images([2])
    assert graph_state.pending().images == {1, 2, 3} and graph_state.pending().splits >= {1, 3}
    assert graph_state.images().keys() == {1, 3, 4, 5} and graph_state.matches() == []
    assert [r.image_id for r in graph_state.occurrence_stats(10)] == [4]
    assert graph_state.component_members([1]) == {1: 1, 3: 1}


def test_state_reads_occurrences_and_histories_of_some(graph_state: GraphState) -> None:
    graph_state.add_posts([("p1", 1, 5, "x"), ("p2", 2, 5, "x")])
    graph_state.save_run({}, 1, [("created", 1, ()), ("created", 2, ())])
    assert [r.image_id for r in graph_state.occurrence_stats(10, [2, 3])] == [2]
    assert list(graph_state.cluster_histories(cluster_ids=[2])) == [2]


def test_sqlite_state_persists(tmp_path: Path) -> None:
    state = SqliteGraphState(tmp_path / "state.db")
    state.add_images([(1, 10)])
    state.add_matches([Match(1, 2, 30, "partial")])
    state.add_posts([("p", 1, 5, "x")])
    state.save_run({1: 7, 2: 7}, 1, [("created", 7, ())], components={1: 3})
    state.add_images([(5, 10)])  # after the run: still pending after a restart
    state.close()
    again = SqliteGraphState(tmp_path / "state.db")
    try:
        assert (again.images(), again.matches(), again.clusters()) == ({1: 10, 5: 10}, [Match(1, 2, 30, "partial")],
                                                                       {1: 7, 2: 7})
        assert again.components_of([1]) == {1: 3} and again.next_ids() == (8, 4) and 5 in again.pending().images
        assert [r.posts for r in again.occurrence_stats(10)] == [1] and list(again.cluster_histories()) == [7]
    finally:
        again.close()


# ----------------------------------------------------------------------------- BatchCatalog


@pytest.fixture(params=["sqlite", "memory"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BatchCatalog]:
    cat = SqliteBatchCatalog(tmp_path / "deep" / "catalog.db") if request.param == "sqlite" else MemoryBatchCatalog()
    yield cat  # the sqlite file's folder is created
    cat.close()


def test_catalog_paths_and_images(catalog: BatchCatalog) -> None:
    catalog.add_images([(1, 100), (2, 200)])
    catalog.add_paths([("a.jpg", 1), ("b.jpg", 2), ("a_copy.jpg", 1)])
    assert catalog.images() == {1: 100, 2: 200}
    assert catalog.paths_by_image() == {1: ["a.jpg", "a_copy.jpg"], 2: ["b.jpg"]}
    catalog.add_images([(1, 999)])  # already there: unchanged
    assert catalog.images()[1] == 100
    catalog.add_paths([("b.jpg", 1)])  # a path now holding another image
    assert catalog.paths_by_image() == {1: ["a.jpg", "a_copy.jpg", "b.jpg"]}


def test_catalog_bad_files(catalog: BatchCatalog) -> None:
    catalog.add_bad([("empty.jpg", "empty", "zero bytes"), ("notes.png", "not_an_image", "no known image format")])
    catalog.add_bad([("empty.jpg", "empty", "zero bytes")])  # seen again: one row
    assert catalog.bad_files() == [("empty.jpg", "empty", "zero bytes"),
                                   ("notes.png", "not_an_image", "no known image format")]
    catalog.add_paths([("c.jpg", 3)])
    assert catalog.indexed_paths() == {"c.jpg"}  # bad files are read again next run
    catalog.add_paths([("empty.jpg", 4)])  # the file was fixed: no longer bad
    assert [b[0] for b in catalog.bad_files()] == ["notes.png"]


def test_catalog_counts(catalog: BatchCatalog) -> None:
    assert catalog.counts() == {"images": 0, "paths": 0, "bad_files": 0}
    catalog.add_images([(i, 10) for i in range(1, 7)])
    catalog.add_paths([(f"{i}.jpg", i) for i in range(1, 7)] + [("dup.jpg", 1)])
    catalog.add_bad([("x.txt", "not_an_image", "")])
    assert catalog.counts() == {"images": 6, "paths": 7, "bad_files": 1}


def test_catalog_matched_flags(catalog: BatchCatalog) -> None:
    catalog.add_images([(3, 1), (1, 1), (2, 1)])
    assert catalog.unmatched() == [1, 2, 3]
    catalog.mark_matched([1, 3])
    assert catalog.unmatched() == [2]
    catalog.add_images([(1, 5), (4, 5)])  # an image seen again keeps its flag
    assert catalog.unmatched() == [2, 4]


def test_sqlite_catalog_persists(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    cat = SqliteBatchCatalog(path)
    cat.add_images([(1, 10)])
    cat.add_paths([("a.jpg", 1)])
    cat.mark_matched([1])
    cat.close()
    again = SqliteBatchCatalog(path)
    try:
        assert again.images() == {1: 10} and again.paths_by_image() == {1: ["a.jpg"]}
        assert again.unmatched() == []
    finally:
        again.close()


# ----------------------------------------------------------------------------- file formats and names

#: the catalog before this split (no format marks; ``matches`` still had ``score``)
OLD_CATALOG = """
CREATE TABLE paths (path TEXT PRIMARY KEY, image_id INTEGER NOT NULL, seen_at REAL NOT NULL);
CREATE TABLE images (image_id INTEGER PRIMARY KEY, nb_points INTEGER NOT NULL, matched INTEGER NOT NULL DEFAULT 0);
CREATE TABLE matches (a INTEGER NOT NULL, b INTEGER NOT NULL, score REAL NOT NULL, inliers INTEGER NOT NULL,
    kind TEXT NOT NULL, PRIMARY KEY (a, b));
INSERT INTO images VALUES (1, 10, 1);
INSERT INTO matches VALUES (1, 2, 30.0, 30, 'full');
"""


def _old_catalog(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(OLD_CATALOG)
    db.close()
    return path


@pytest.mark.parametrize("store", [SqliteGraphState, SqliteBatchCatalog])
def test_an_old_file_is_refused_in_one_line_that_says_what_to_do(tmp_path: Path, store: type) -> None:
    path = _old_catalog(tmp_path / "catalog.db")
    with pytest.raises(IncompatibleFile) as err:
        store(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "older memetrace" in message
    assert "delete it" in message and "memetrace index" in message
    with sqlite3.connect(path) as db:  # untouched: the user decides
        assert db.execute("SELECT score FROM matches").fetchall() == [(30.0,)]


def test_a_file_of_another_store_or_version_is_refused(tmp_path: Path) -> None:
    SqliteGraphState(tmp_path / "state.db").close()
    with pytest.raises(IncompatibleFile, match="another store's data"):
        SqliteBatchCatalog(tmp_path / "state.db")
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("PRAGMA user_version = 1")  # the layout before incremental runs
    with pytest.raises(IncompatibleFile, match="clusterer state of schema version 3: it has schema version 1"):
        SqliteGraphState(tmp_path / "state.db")


def test_the_cli_reports_an_old_catalog_in_one_line(tmp_path: Path, clean_env: None) -> None:
    _old_catalog(tmp_path / "data" / "catalog.db")
    result = invoke("--data-dir", str(tmp_path / "data"), "stats")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "catalog.db" in line and "delete it" in line


def test_the_old_catalog_path_setting_now_names_the_clusterer_state(clean_env: None, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMETRACE_CATALOG_PATH", str(tmp_path / "old.db"))
    assert Settings().resolved_cluster_state_path() == tmp_path / "old.db"
    monkeypatch.setenv("MEMETRACE_CLUSTER_STATE_PATH", str(tmp_path / "new.db"))
    assert Settings().resolved_cluster_state_path() == tmp_path / "new.db"  # the new name wins


# ----------------------------------------------------------------------------- the batch feeds the clusterer


def test_the_batch_feeds_images_edges_and_files_as_occurrences() -> None:
    batch, state = MemoryBatchCatalog(), MemoryGraphState()
    batch.add_images([(1, 10), (2, 20)])
    batch.add_paths([("/c/a.jpg", 1), ("/c/a_copy.jpg", 1), ("/c/b.jpg", 2)])
    todo = to_match(batch, state)
    assert todo == [1, 2]
    feed(state, batch, todo, [Match(1, 2, 40, "full")], known_paths=set())
    batch.mark_matched(todo)
    assert state.images() == {1: 10, 2: 20} and state.matches() == [Match(1, 2, 40, "full")]
    assert {(r.image_id, r.platform, r.posts) for r in state.occurrence_stats(0)} == {(1, "file", 2), (2, "file", 1)}
    # next run: one more file of image 2, nothing to match; the file is one more occurrence
    batch.add_paths([("/c/b_again.jpg", 2)])
    assert to_match(batch, state) == []
    feed(state, batch, [], [], known_paths={"/c/a.jpg", "/c/a_copy.jpg", "/c/b.jpg"})
    assert {(r.image_id, r.posts) for r in state.occurrence_stats(0)} == {(1, 2), (2, 2)}


def test_a_lost_state_is_refilled_by_the_next_batch_run() -> None:
    batch = MemoryBatchCatalog()
    batch.add_images([(1, 10), (2, 20), (3, 30)])
    batch.mark_matched([1, 2, 3])
    fresh = MemoryGraphState()  # the state file was deleted (or refused and deleted)
    fresh.add_images([(2, 20)])
    assert to_match(batch, fresh) == [1, 3]  # matched again: their edges and files go to the new state


# ----------------------------------------------------------------------------- SQLite's disk errors


def _events(n: int, first: int = 0) -> list:
    from test_poison import record

    from memetrace.messages import MatchEvent

    s = Settings()
    return [record(first + i, MatchEvent.of(Match(2 * i + 1, 2 * i + 2, 30, "full")).to_bytes(),
                   topic=s.kafka_matches_topic) for i in range(n)]


def _cluster_worker(tmp_path: Path, state: GraphState, records: list):
    from conftest import make_settings
    from prometheus_client import CollectorRegistry
    from test_poison import ListConsumer

    from memetrace.cluster_board import MemoryClusterBoard
    from memetrace.clusterer.metrics import ClusterMetrics
    from memetrace.clusterer.worker import ClusterWorker

    s = make_settings(tmp_path, retry_max_s=0.05)
    return ClusterWorker(s, state, MemoryClusterBoard(), ClusterMetrics(CollectorRegistry()), 3600,
                         ListConsumer(records))


def test_a_full_sqlite_file_is_a_disk_outage_that_rolls_back(tmp_path: Path) -> None:
    state = SqliteGraphState(tmp_path / "state.db")
    state.add_images([(1, 10)])
    pages = state.file.db.execute("PRAGMA page_count").fetchone()[0]
    state.file.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full"
    with pytest.raises(DependencyDown, match="database or disk is full") as err:
        state.add_images([(i, i) for i in range(2, 20_000)])
    assert err.value.dependency == "disk" and str(tmp_path / "state.db") in err.value.detail
    assert state.images() == {1: 10}  # nothing of the failed transaction, and the file still answers
    state.file.db.execute("PRAGMA max_page_count = 1000000")  # space freed: the same write succeeds
    state.add_images([(i, i) for i in range(2, 20_000)])
    assert len(state.images()) == 19_999
    state.close()


def test_a_locked_sqlite_file_is_a_disk_outage(tmp_path: Path) -> None:
    state = SqliteGraphState(tmp_path / "state.db")
    state.file.db.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(DependencyDown, match="database is locked") as err:
        state.add_matches([Match(1, 2, 30, "full")])
    assert err.value.dependency == "disk"
    other.execute("COMMIT")
    state.add_matches([Match(1, 2, 30, "full")])
    assert state.matches() == [Match(1, 2, 30, "full")]
    other.close()
    state.close()


def _read_only_state(path: Path) -> SqliteGraphState:
    """A state whose file is open read-only, as on a read-only volume (tests run as root, which
    chmod does not stop)."""
    state = SqliteGraphState(path)
    state.file.db.close()
    state.file.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
    return state


def test_a_read_only_sqlite_file_is_storage_denied(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = _read_only_state(path)
    with pytest.raises(StorageDenied, match="readonly database") as err:
        state.add_images([(1, 10)])
    assert str(path) in str(err.value) and "writable" in str(err.value)
    state.close()


def test_an_unopenable_sqlite_file_is_storage_denied(tmp_path: Path) -> None:
    (tmp_path / "state.db").mkdir()  # a folder where the file should be: SQLITE_CANTOPEN
    with pytest.raises(StorageDenied, match="unable to open database file"):
        SqliteGraphState(tmp_path / "state.db")


def test_the_clusterer_waits_while_its_state_is_locked_then_stores_the_batch(tmp_path: Path) -> None:
    state = SqliteGraphState(tmp_path / "state.db")
    state.file.db.execute("PRAGMA busy_timeout = 20")
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    w = _cluster_worker(tmp_path, state, _events(3))
    seen: list[str] = []

    def release_once_waiting() -> None:  # the lock goes once the worker reports it waits for the disk
        while not seen or not seen[-1].startswith("retrying disk"):
            seen.append(w.readiness()[1])
            time.sleep(0.01)
        other.execute("COMMIT")

    release = threading.Thread(target=release_once_waiting, daemon=True)
    release.start()
    w.run(max_idle=0.3)
    release.join(timeout=10)
    assert "database is locked" in seen[-1]
    assert w.metrics.registry.get_sample_value("memetrace_retries_total", {"target": "disk"}) >= 1
    assert len(state.matches()) == 3 and w.last_run is not None
    assert max(o.offset for c in w.consumer.commits for o in c.values()) == 3
    other.close()
    state.close()


def test_the_clusterer_stops_on_a_read_only_state_without_committing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = _read_only_state(path)
    w = _cluster_worker(tmp_path, state, _events(2))
    with pytest.raises(StorageDenied, match=str(path)):
        w.run(max_idle=0.3)
    assert w.consumer.commits == []
