"""Derivation trees (issue 14): the cues and the forest on hand-made geometry, the posts CSV of
``index --posts``, the tree store's contract on both backends, and a folder indexed with its
posts through the CLI, whose ``tree`` CSV names the original as root."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import load_photo, make_settings
from tests.browser import render, require_browser
from memetrace.api.trees import cluster_tree
from memetrace.cli.context import Context
from memetrace.cli.main import main
from memetrace.cli.posts import PostsFileError, PostsReport, parse_time, read_posts, record_posts
from memetrace.clusterer.service import recluster
from memetrace.clusterer.state import MemoryGraphState
from memetrace.clusterer.tree import Seen, TreeConfig, forest, geometry_cue, time_cue
from memetrace.clusterer.tree_export import tree_rows, write_tree
from memetrace.clusterer.tree_update import TreeEdgeCache, current_trees, first_posts, update_trees
from memetrace.feature_store import MemoryFeatureStore
from memetrace.models import Derivation, Geometry, Match, OccurrenceRow
from memetrace.occurrence_log import MemoryOccurrenceLog
from memetrace.tree_store import MemoryTreeStore, SqliteTreeStore

HOUR = 3600


def geo(size_a, box_a, size_b, box_b, scale=1.0, cover_a=1.0, cover_b=1.0, mirrored=False) -> Geometry:
    return Geometry(box_a, box_b, scale, 0.0, mirrored, 200, cover_a, cover_b, size_a, size_b)


# origin 1 (800x600); 2: a crop of it (its box is a quarter of 1, all of 2; 1's rest is textured);
# 3: a caption of it (1 is all of 3 but a flat band: 3 fully covered); 4: 1 scaled to half
CROP = geo((800, 600), (0, 0, 400, 300), (400, 300), (0, 0, 400, 300), cover_a=0.4, cover_b=1.0)
CAPTION = geo((800, 600), (0, 0, 800, 600), (800, 900), (0, 150, 800, 750), cover_a=1.0, cover_b=0.9)
SCALE = geo((800, 600), (0, 0, 800, 600), (400, 300), (0, 0, 400, 300), scale=0.5)


def test_each_cue_points_from_the_source_to_the_copy() -> None:
    cfg = TreeConfig()
    for g in (CROP, CAPTION, SCALE):
        assert geometry_cue(Seen.of(g), cfg) > 1.0
        assert geometry_cue(Seen.of(g.swapped()), cfg) == pytest.approx(-geometry_cue(Seen.of(g), cfg))
    # time alone: the earlier image is the source
    flat = geo((800, 600), (0, 0, 800, 600), (800, 600), (0, 0, 800, 600))
    assert time_cue(5.0, cfg) > 0 > time_cue(-5.0, cfg) and time_cue(None, cfg) == 0
    assert time_cue(5.0, cfg) + geometry_cue(Seen.of(flat), cfg) > 0 > time_cue(-5.0, cfg) + geometry_cue(Seen.of(flat), cfg)


def test_forest_hangs_each_edit_under_the_original() -> None:
    matches = [Match(1, 2, 300, "partial", CROP), Match(1, 3, 400, "partial", CAPTION),
               Match(1, 4, 350, "full", SCALE), Match(2, 3, 150, "partial", None)]
    for seen in ({1: 0, 2: 2 * HOUR, 3: 12 * HOUR, 4: 13 * HOUR},
                 # the original's posts were all missed (a file, no post): the geometry alone orients it
                 {2: 2 * HOUR, 3: 12 * HOUR, 4: 13 * HOUR}):
        tree = forest([1, 2, 3, 4], seen, matches)
        assert {i: d.parent for i, d in tree.items()} == {1: None, 2: 1, 3: 1, 4: 1}
        assert (tree[2].edit, tree[3].edit, tree[4].edit) == ("crop", "caption", "scale")
        assert all(0.0 <= d.confidence <= 1.0 for d in tree.values())


def test_a_crop_seen_hours_before_its_source_is_taken_for_it() -> None:
    """The known cost of the veto (docs/propagation.md): where the posting time and the crop's geometry
    disagree with equal strength, the time wins the pair. Pinned so that changing it is deliberate."""
    tree = forest([1, 2], {1: 6 * HOUR, 2: 0}, [Match(1, 2, 300, "partial", CROP)])
    assert {i: d.parent for i, d in tree.items()} == {1: 2, 2: None}


def test_geometry_vetoes_but_does_not_attract_a_sibling() -> None:
    # 2: 1 under a textured caption band (its text's keypoints unmatched); 3: a recolour of 1. 2 holds
    # 3 as a crop's source would, and matches it as well as 1 does: that must not make 2 its parent
    captioned = geo((800, 600), (0, 0, 800, 600), (800, 800), (0, 200, 800, 800), cover_a=1.0, cover_b=0.75)
    recolour = geo((800, 600), (0, 0, 800, 600), (800, 600), (0, 0, 800, 600))
    matches = [Match(1, 2, 300, "partial", captioned), Match(1, 3, 300, "full", recolour),
               Match(2, 3, 300, "partial", captioned.swapped())]
    tree = forest([1, 2, 3], {1: 0, 2: HOUR, 3: 5 * HOUR}, matches)
    assert {i: d.parent for i, d in tree.items()} == {1: None, 2: 1, 3: 1}


def test_a_near_tie_goes_to_the_older_of_parent_and_grandparent() -> None:
    same = geo((800, 600), (0, 0, 800, 600), (800, 600), (0, 0, 800, 600))
    seen = {1: 0, 2: HOUR, 3: 5 * HOUR}

    def parents(inliers_13: int, inliers_23: int) -> dict[int, int | None]:
        # 2 is a re-encode of 1; 3 matches both, 2 a little better
        matches = [Match(1, 2, 500, "full", same), Match(1, 3, inliers_13, "full", same),
                   Match(2, 3, inliers_23, "full", same)]
        return {i: d.parent for i, d in forest([1, 2, 3], seen, matches).items()}

    assert parents(300, 303) == {1: None, 2: 1, 3: 1}  # within the margin: the older image
    assert parents(200, 400) == {1: None, 2: 1, 3: 2}  # clearly closer to 2: its parent stays 2


def test_a_near_tie_goes_to_the_candidate_whose_edit_the_member_carries() -> None:
    """The inheritance cue: 2 is 1 with a sticker; 3 matches 1 and 2 about as well. On the pixels
    where 1 and 2 differ (the sticker) 3's thumbnail tells which it was made from, whatever the
    closest-ancestor rule alone would say."""
    same = geo((800, 600), (0, 0, 800, 600), (800, 600), (0, 0, 800, 600))
    rng = np.random.default_rng(3)
    photo = np.repeat(rng.integers(0, 256, (60, 80, 1), dtype=np.uint8), 3, axis=2)
    sticker = photo.copy()
    sticker[10:30, 20:50] = 255
    seen = {1: 0, 2: HOUR, 3: 5 * HOUR}

    def parents(inliers_13: int, inliers_23: int, three: np.ndarray | None) -> dict[int, int | None]:
        matches = [Match(1, 2, 500, "full", same), Match(1, 3, inliers_13, "full", same),
                   Match(2, 3, inliers_23, "full", same)]
        thumbs = {1: photo, 2: sticker, 3: three}
        return {i: d.parent for i, d in forest([1, 2, 3], seen, matches, thumbnail=thumbs.get).items()}

    # within ancestor_margin: without the thumbnails the older image; 3 shows the sticker: 2's child
    assert parents(300, 303, None)[3] == 1
    assert parents(300, 303, sticker) == {1: None, 2: 1, 3: 2}
    # 2 explains 3 better by more than ancestor_margin, within inherit_margin; 3 lacks the sticker: 1's
    assert parents(250, 300, None)[3] == 2
    assert parents(250, 300, photo) == {1: None, 2: 1, 3: 1}
    # beyond inherit_margin the keypoints decide and no thumbnail is read
    asked: list[int] = []
    matches = [Match(1, 2, 500, "full", same), Match(1, 3, 150, "full", same), Match(2, 3, 300, "full", same)]
    forest([1, 2, 3], seen, matches, thumbnail=lambda i: asked.append(i))
    assert asked == []


def test_two_unrelated_images_are_two_roots() -> None:
    tree = forest([1, 2], {1: 0, 2: HOUR}, [])
    assert tree[1].parent is None and tree[2].parent is None


# ----------------------------------------------------------------------------- posts CSV


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def post(path: str, pid: str, at: str, **extra: str) -> dict:
    return {"path": path, "post_id": pid, "posted_at": at, "platform": "reddit", "author": "@a", **extra}


def test_posts_csv_times_paths_meta_and_bad_rows(tmp_path: Path) -> None:
    assert parse_time("2026-01-05T00:26:14Z") == parse_time("1767572774") == 1767572774
    assert parse_time("2026-01-05T01:26:14+01:00") == 1767572774 and parse_time("") == -1
    f = write_csv(tmp_path / "posts.csv", [post("a.jpg", "p1", "2026-01-05T00:26:14Z", lang="fr"),
                                           post("/abs/b.jpg", "p2", "1767572774", lang=""),
                                           post("c.jpg", "", "1"), post("d.jpg", "p4", "yesterday")])
    report = PostsReport()
    posts = read_posts(f, report)
    assert [p.path for p in posts] == [str(tmp_path / "a.jpg"), "/abs/b.jpg"]
    assert posts[0].meta == {"lang": "fr"} and posts[1].posted_at == 1767572774
    assert (report.rows, report.bad_rows) == (4, 2) and len(report.bad_examples) == 2


def test_a_posts_csv_without_its_columns_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("path,when\na.jpg,1\n")
    with pytest.raises(PostsFileError, match="missing column.*post_id"):
        read_posts(tmp_path / "p.csv", PostsReport())
    (tmp_path / "p.csv").write_text("path,post_id,posted_at,platform,author,post_id\na.jpg,1,,x,y,2\n")
    with pytest.raises(PostsFileError, match="post_id named more than once"):
        read_posts(tmp_path / "p.csv", PostsReport())


def test_extra_columns_are_meta_unnamed_and_repeated_ones_are_reported(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text(" path ,post_id,posted_at,platform,author,likes,,caption,likes\n"
                                    "a.jpg,p1,,x,@a, 12 ,zz,hi,13\n"
                                    "\n"  # a blank line: no row
                                    "b.jpg,p2,,x,@a,,zz,\n")  # empty cells and a short row: no meta
    report = PostsReport()
    posts = read_posts(tmp_path / "p.csv", report)
    assert [p.meta for p in posts] == [{"likes": "12", "caption": "hi"}, {}]
    assert report.ignored_columns == ["(no name) (column 7)", "likes (column 9)"] and report.rows == 2


def test_posts_are_recorded_once_and_unknown_files_reported(tmp_path: Path) -> None:
    f = write_csv(tmp_path / "posts.csv", [post("a.jpg", "p1", "100"), post("a.jpg", "p2", "50"),
                                           post("gone.jpg", "p3", "10")])
    state, log = MemoryGraphState(), MemoryOccurrenceLog()
    state.add_images([(7, 100)])
    for _ in range(2):  # a second run (a redelivery) changes nothing
        report = PostsReport()
        record_posts(read_posts(f, report), {str(tmp_path / "a.jpg"): 7}, state, log, report)
    assert (report.recorded, report.unknown_files) == (2, 1)
    assert report.unknown_examples == [str(tmp_path / "gone.jpg")]
    assert log.count_occurrences() == 2 and {o.author for o in log.occurrences_of([7])} == {"@a"}
    assert first_posts(state, [7]) == {7: 50}


def test_the_tree_endpoint_shows_each_node_s_first_post_with_its_meta() -> None:
    log = MemoryOccurrenceLog()
    log.add_occurrences([OccurrenceRow(1, 1, "p1", "u1", 100, "reddit", "@a", meta={"likes": "3"}),
                         OccurrenceRow(2, 1, "p0", "u0", 50, "x", "@b", meta={"likes": "9", "caption": "first"}),
                         OccurrenceRow(3, 2, "p2", "u2", 200, "x", "@c")])
    tree = cluster_tree(5, [Derivation(1, None, "", 0.9), Derivation(2, 1, "crop", 0.8)], {}, log, str)
    first = {n.image_id: n.first_post for n in tree.nodes}
    assert first[1] is not None and first[1].post_id == "p0" and first[1].meta == {"likes": "9", "caption": "first"}
    assert first[2] is not None and first[2].meta == {}
    assert tree.nodes[0].author == "@b"


def test_tree_files_carry_each_image_s_first_post_after_the_issue_s_columns(tmp_path: Path) -> None:
    first = {1: OccurrenceRow(9, 1, "p1", "u", 100, "reddit", "@a", meta={"likes": "3", "caption": "日本"})}
    rows = tree_rows({5: [Derivation(2, 1, "crop", 0.8), Derivation(1, None, "", 0.9)]}, {1: "a.jpg", 2: "b.jpg"},
                     {1: 100}, first)
    with write_tree(rows, tmp_path / "t.csv").open(encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["path", "parent_path", "cluster_id", "edit", "confidence", "first_seen",
                        "first_post_id", "platform", "author", "meta"]
    assert table[1][6:] == ["p1", "reddit", "@a", '{"likes":"3","caption":"日本"}'] and table[2][6:] == ["", "", "", ""]
    doc = json.loads(write_tree(rows, tmp_path / "t.json", "json").read_text())
    assert doc[0]["meta"] == {"likes": "3", "caption": "日本"} and doc[1]["meta"] == {} and doc[1]["parent_path"] == "a.jpg"
    graph = nx.read_graphml(write_tree(rows, tmp_path / "t.graphml", "graphml"))
    assert json.loads(graph.nodes["a.jpg"]["meta"]) == {"likes": "3", "caption": "日本"}
    assert list(graph.edges) == [("a.jpg", "b.jpg")]


# ----------------------------------------------------------------------------- tree store


@pytest.fixture(params=["sqlite", "memory"])
def tree_store(request: pytest.FixtureRequest, tmp_path: Path):
    store = SqliteTreeStore(tmp_path / "trees.db") if request.param == "sqlite" else MemoryTreeStore()
    yield store
    store.close()


def test_tree_store_replaces_and_drops_whole_trees(tree_store) -> None:
    first = [Derivation(2, 1, "crop", 0.9), Derivation(1, None, "", 0.8)]
    tree_store.put(5, first)
    tree_store.put(6, [Derivation(3, None, "", 0.5)])
    assert tree_store.get(5) == sorted(first, key=lambda d: d.image_id)
    tree_store.put(5, [Derivation(1, 2, "pad", 0.6), Derivation(2, None, "", 0.7)])
    assert [d.parent for d in tree_store.get(5)] == [2, None]
    tree_store.put(6, [])
    assert tree_store.cluster_ids() == [5] and tree_store.get(6) == []


def test_update_trees_follows_the_touched_clusters(graph_state) -> None:
    graph_state.add_images([(1, 100), (2, 100)])
    graph_state.add_matches([Match(1, 2, 300, "partial", CROP)])
    graph_state.add_posts([("p1", 1, 100, "reddit"), ("p2", 2, 200, "twitter"), ("file:x", 2, -1, "file")])
    touched = recluster(graph_state, "components").touched
    store = MemoryTreeStore()
    cid = graph_state.clusters()[1]
    assert touched == [cid] and update_trees(graph_state, None, store, touched) == 1
    tree = {d.image_id: d for d in store.get(cid)}
    assert tree[2].parent == 1 and tree[2].edit == "crop" and tree[1].parent is None
    before = store.get(cid)
    update_trees(graph_state, None, store, [cid])  # redelivery: the same tree
    assert store.get(cid) == before


def test_the_tree_verifies_every_pair_of_a_small_cluster_again(graph_state) -> None:
    graph_state.add_images([(1, 100), (2, 100), (3, 100)])
    # 3 (1 at half size) was verified against 2 only: its parent must come from elsewhere
    graph_state.add_matches([Match(1, 2, 300, "partial", CROP), Match(2, 3, 150, "partial", None)])
    graph_state.add_posts([("p1", 1, 100, "reddit"), ("p2", 2, 200, "reddit"), ("p3", 3, 300, "reddit")])
    touched = recluster(graph_state, "components").touched
    asked: list[tuple[list, dict]] = []

    def verify(pairs, sizes):  # 1-2 verifies again, 1-3 verifies now, 2-3 does not
        asked.append((list(pairs), dict(sizes)))
        return [Match(1, 2, 300, "partial", CROP), Match(1, 3, 350, "full", SCALE)]

    without, store = MemoryTreeStore(), MemoryTreeStore()
    update_trees(graph_state, None, without, touched)
    update_trees(graph_state, None, store, touched, verify=verify)
    (cid,) = touched
    assert {d.image_id: d.parent for d in without.get(cid)}[3] == 2
    assert asked == [([(1, 2), (1, 3), (2, 3)], {1: (800, 600), 2: (400, 300)})]
    tree = {d.image_id: d for d in store.get(cid)}
    assert (tree[2].parent, tree[3].parent, tree[3].edit) == (1, 1, "scale")
    # a cluster with more pairs than the tree may verify: the stored edges alone
    asked.clear()
    update_trees(graph_state, None, MemoryTreeStore(), touched, TreeConfig(max_verified_pairs=2), verify=verify)
    assert asked == []
    # memetrace tree: the stored trees, nothing redone
    assert current_trees(graph_state, None, store, verify=verify) == {cid: store.get(cid)} and asked == []


class CountingStore(MemoryFeatureStore):
    """Thumbnails of ids 1..4 (a gradient at each member's file size), reads counted."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        for i, (w, h) in {1: (800, 600), 2: (400, 300), 3: (800, 900), 4: (400, 300)}.items():
            im = Image.fromarray(np.add.outer(np.arange(h) * i % 256, np.arange(w) % 256).astype(np.uint8))
            data = io.BytesIO()
            im.resize((w // 4, h // 4)).convert("RGB").save(data, "JPEG")
            self.put_thumbnail(i, data.getvalue())

    def get_thumbnail(self, image_id: int) -> bytes | None:
        self.reads += 1
        return super().get_thumbnail(image_id)


def test_the_tree_cache_reuses_a_member_set_and_gives_the_same_trees(graph_state) -> None:
    graph_state.add_images([(1, 100), (2, 100), (3, 100)])
    graph_state.add_matches([Match(1, 2, 300, "partial", CROP), Match(2, 3, 150, "partial", None)])
    graph_state.add_posts([("p1", 1, 100, "reddit"), ("p2", 2, 200, "reddit"), ("p3", 3, 300, "reddit")])
    asked: list[list] = []
    verified = {(1, 2): Match(1, 2, 300, "partial", CROP), (1, 3): Match(1, 3, 400, "partial", CAPTION),
                (1, 4): Match(1, 4, 350, "full", SCALE)}

    def verify(pairs, sizes):  # the cached runs' verifier, its calls recorded
        asked.append(list(pairs))
        return same(pairs, sizes)

    def same(pairs, sizes):
        return [verified[p] for p in pairs if p in verified]

    features, cache = CountingStore(), TreeEdgeCache()
    cached, fresh = MemoryTreeStore(), MemoryTreeStore()

    def run() -> int:  # a reclustering run, its trees redone with the cache and without; verifier calls made
        touched, calls = recluster(graph_state, "components").touched, len(asked)
        update_trees(graph_state, features, cached, touched, verify=verify, cache=cache)
        made = len(asked) - calls
        update_trees(graph_state, CountingStore(), fresh, touched, verify=same)
        assert cached.cluster_ids() == fresh.cluster_ids()
        assert all(cached.get(c) == fresh.get(c) for c in fresh.cluster_ids())
        return made

    assert run() == 1 and features.reads == 3 and len(cache) == 1
    (cid,) = cached.cluster_ids()
    first = cached.get(cid)
    # new posts of its images only: the cluster is touched, nothing is verified or decoded again
    graph_state.add_posts([("p4", 3, 50, "twitter")])
    reads = features.reads
    assert run() == 0 and features.reads == reads and cached.get(cid) != first  # 3 now posted first
    update_trees(graph_state, features, cached, [cid], verify=verify, cache=cache)  # redelivery
    assert len(asked) == 1 and cached.get(cid) == fresh.get(cid)
    # a stored edge changed among the same members: made again
    graph_state.add_matches([Match(2, 3, 180, "partial", None)])
    assert run() == 1
    # a member joins: verified again, the new pairs with it
    graph_state.add_images([(4, 100)])
    graph_state.add_matches([Match(1, 4, 350, "full", SCALE)])
    graph_state.add_posts([("p5", 4, 400, "reddit")])
    assert run() == 1 and asked[-1] == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert {d.image_id: d.parent for d in cached.get(cid)}[4] == 1


# ----------------------------------------------------------------------------- end to end


def test_index_with_posts_then_tree_csv(tmp_path: Path, embedder) -> None:
    folder = tmp_path / "memes"
    folder.mkdir()
    im = load_photo("astronaut")
    im.save(folder / "origin.jpg", quality=92)
    w, h = im.size
    im.crop((0, 0, w // 2, h // 2)).save(folder / "crop.jpg", quality=85)
    padded = Image.new("RGB", (w, h + h // 4), (255, 255, 255))
    padded.paste(im, (0, h // 8))
    padded.save(folder / "pad.jpg", quality=85)
    posts = write_csv(tmp_path / "posts.csv", [post("memes/origin.jpg", "p1", "2026-01-05T10:00:00Z", likes="40",
                                                    caption="the original"),
                                               post("memes/crop.jpg", "p2", "2026-01-05T11:00:00Z"),
                                               post("memes/pad.jpg", "p3", "2026-01-05T12:00:00Z"),
                                               post("memes/nowhere.jpg", "p4", "2026-01-05T12:00:00Z")])
    data = tmp_path / "data"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        run = CliRunner().invoke(main, ["--data-dir", str(data), "index", str(folder), "--posts", str(posts)],
                                 obj=embedder)
        assert run.exit_code == 0, run.output
        summary = json.loads(run.stdout[run.stdout.index("{"):])
        assert summary["posts"]["recorded"] == 3 and summary["posts"]["unknown_files"] == 1
        out = tmp_path / "parents.csv"
        made = CliRunner().invoke(main, ["--data-dir", str(data), "tree", "--out", str(out)], obj=embedder)
        assert made.exit_code == 0, made.output
        gallery = CliRunner().invoke(main, ["--data-dir", str(data), "export", "--out", str(tmp_path / "c.csv"),
                                            "--html", str(tmp_path / "html")], obj=embedder)
        assert gallery.exit_code == 0, gallery.output
    finally:
        root.handlers[:], root.level = handlers, level
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows["origin.jpg"]["parent_path"] == ""
    assert Path(rows["crop.jpg"]["parent_path"]).name == "origin.jpg" and rows["crop.jpg"]["edit"] == "crop"
    assert Path(rows["pad.jpg"]["parent_path"]).name == "origin.jpg"
    assert rows["origin.jpg"]["first_seen"] == "2026-01-05T10:00:00Z"
    assert list(rows["origin.jpg"])[:6] == ["path", "parent_path", "cluster_id", "edit", "confidence", "first_seen"]
    assert (rows["origin.jpg"]["first_post_id"], rows["origin.jpg"]["author"]) == ("p1", "@a")
    assert json.loads(rows["origin.jpg"]["meta"]) == {"likes": "40", "caption": "the original"}
    assert rows["crop.jpg"]["meta"] == "" and rows["crop.jpg"]["platform"] == "reddit"
    ctx = Context(make_settings(data))
    log = ctx.occurrences
    assert {o.post_id: o.meta for o in log.occurrences_of(log.image_ids_of_occurrences())} == {
        "p1": {"likes": "40", "caption": "the original"}, "p2": {}, "p3": {}}
    ctx.close()

    page = (tmp_path / "html" / "index.html").read_text()
    assert "Derivation tree" in page and "origin" in page and "crop" in page
    assert "posts per 1 h by platform" in page and "reddit" in page
    require_browser()
    shown = render((tmp_path / "html" / "index.html").as_uri(), png=tmp_path / "tree.png")
    assert not shown.errors, shown.errors
    assert shown.dom.count('class="node"') == 3 and "<svg" in shown.dom


def test_tree_metrics_say_how_far_and_deep_a_cluster_spread(graph_state) -> None:
    from prometheus_client import CollectorRegistry

    from memetrace.clusterer.metrics import TreeMetrics

    graph_state.add_images([(1, 100), (2, 100), (3, 100)])
    graph_state.add_matches([Match(1, 2, 300, "partial", CROP), Match(2, 3, 300, "full", SCALE)])
    graph_state.add_posts([("p1", 1, 0, "reddit"), ("p2", 2, HOUR, "twitter"), ("p3", 3, 3 * HOUR, "twitter")])
    registry = CollectorRegistry()
    update_trees(graph_state, None, MemoryTreeStore(), recluster(graph_state, "components").touched,
                 metrics=TreeMetrics(registry))
    assert registry.get_sample_value("memetrace_tree_depth_sum") == 2
    assert registry.get_sample_value("memetrace_tree_platforms_reached_sum") == 2
    assert registry.get_sample_value("memetrace_tree_copy_delay_seconds_sum", {"n": "2"}) == HOUR
    assert registry.get_sample_value("memetrace_tree_copy_delay_seconds_count", {"n": "5"}) is None
