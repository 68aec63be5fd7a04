"""One reclustering run: what changed → the components it touches → communities with stable ids →
history, per-cluster stats → published.

The same run serves ``memetrace index`` (batch) and the clusterer service (every N seconds), on the
clusterer's :class:`~memetrace.clusterer.state.GraphState`::

    state.pending (change log) ─► touched components (labels ─► members ─► their edges ─► ...)
        ─► partition ─► stable_ids(previous of those images) ─► diff ─► events
                                                                  │
    state.posts of those images ─► occurrence stats per cluster ─► summaries ◄┘
                                                                  │
    state.clusters, labels, history; log cleared ◄── saved ──┬── published ──► the API's store

For connected components and a run that only adds (no removal), :func:`grow` merges whole labels
(each one node weighing its images) and reads only the images whose cluster or label changes;
otherwise :func:`recompute` redoes the touched components image by image. Growing, a summary adds
to the post totals the state kept of the clusters merged (``cluster_posts``) their new posts, so a
giant cluster's posts are not read again; each run saves the totals of the clusters it recomputed.
A run costs what its touched components hold (or, growing, what changes in them), not the corpus:
an untouched component keeps its communities and their ids, so recomputing only the touched ones
gives exactly what a full recomputation (``full=True``) would, ids included
(tests/test_clusterer.py compares them). Only touched clusters get a new summary: an untouched
cluster's growth figures are as of its ``updated_at``. A run that fails before saving (publish
down, crash) leaves the change log, so the next run recomputes and publishes the same clusters again.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from memetrace.clusterer.graph import Edge, choose, communities_of, components, stable_ids
from memetrace.clusterer.history import ClusterEvent, diff, multi_image_clusters
from memetrace.clusterer.state import GraphState, Pending, PostTotals, add_totals
from memetrace.models import ClusterSummary, Match

#: publish(changed assignment, summaries, removed cluster ids), e.g. ClusterBoard.publish
Publish = Callable[[dict[int, int], list[ClusterSummary], list[int]], None]

HISTORY = 20  # latest events per cluster in its summary


@dataclass
class ClusterRun:
    at: int
    seconds: float
    clusters: int  # of 2+ images, in the whole state after the run
    images_clustered: int
    largest: int
    events: list[ClusterEvent] = field(default_factory=list)
    summaries: list[ClusterSummary] = field(default_factory=list)  # the clusters (2+) this run recomputed
    removed: list[int] = field(default_factory=list)  # clusters (2+) gone: merged away, dissolved, removed
    images_touched: int = 0  # in the components it recomputed

    @property
    def new_clusters(self) -> int:
        return sum(e.event == "created" for e in self.events)

    @property
    def touched(self) -> list[int]:
        """The clusters whose members or summary this run changed (what a derivation tree follows)."""
        return sorted({c.cluster_id for c in self.summaries} | set(self.removed))


@dataclass
class Scope:
    """The part of the graph a run recomputes: whole components, with what they had before."""
    images: set[int]  # known images
    edges: list[Edge]  # between two of them: the real ones, or (components) any joining them alike
    labels: dict[int, int]  # their component labels before (images in a component of 2+)
    previous: dict[int, int]  # cluster ids before: of these images, and of images removed since
    cursor: int | None  # the change log read (None: a full run does not clear it)


@dataclass
class Plan:
    """What a run decided, before it is published and saved."""
    changed: dict[int, int]  # image -> its new cluster id
    dropped: list[int]  # removed images: their assignment goes
    labels: dict[int, int | None]  # image -> its new component label (None: now alone)
    events: list[ClusterEvent]
    sizes: dict[int, int]  # cluster (2+) recomputed -> images
    occurrences: list[tuple[int, str, int, int, int, int, int]]  # (cluster, platform, posts, first, last, hour, day)
    removed: list[int]  # clusters (2+) gone
    images_touched: int
    cursor: int | None


def recluster(state: GraphState, algorithm: str, publish: Publish | None = None, now: float | None = None,
              full: bool = False) -> ClusterRun:
    """Recompute the clusters the changes since the last run touched (``full``: all of them, and
    publish every assignment); ``publish`` gets the assignments that changed."""
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    plan = grow(state, now) if algorithm == "components" and not full else None
    plan = plan or recompute(everything(state) if full else touched(state, algorithm), state, algorithm, now)
    events = plan.events
    summaries = summarize(state, plan.sizes, plan.occurrences, now, events)
    if publish is not None:  # before the state moves on: a failed publish is redone by the next run
        publish(state.clusters() if full else plan.changed, summaries, plan.removed)
    state.save_run(plan.changed, int(now), [e.as_row() for e in events], components=plan.labels, dropped=plan.dropped,
                   cursor=plan.cursor, posts=post_totals(plan))  # only now: a failed run records nothing, keeps the log
    clusters, images, largest = state.totals()
    return ClusterRun(int(now), time.perf_counter() - t0, clusters, images, largest, events, summaries, plan.removed,
                      plan.images_touched)


def recompute(scope: Scope, state: GraphState, algorithm: str, now: float) -> Plan:
    """Components and communities of the ``scope``, image by image."""
    next_cluster, next_label = state.next_ids()
    parts = components(scope.images, scope.edges)
    labels = component_labels(scope, parts, next_label)
    assignment = stable_ids(communities_of(parts, scope.edges, algorithm), scope.previous, next_cluster)
    previous = scope.previous
    changed = {i: c for i, c in assignment.items() if previous.get(i) != c}
    groups = multi_image_clusters(assignment)
    cluster_of = {image: cid for cid, images in groups.items() for image in images}
    rows = [(cluster_of[r.image_id], *r[1:]) for r in state.occurrence_stats(now, cluster_of.keys())]
    return Plan(changed, sorted(previous.keys() - assignment.keys()), labels, diff(previous, assignment),
                {cid: len(images) for cid, images in groups.items()}, rows,
                sorted(set(multi_image_clusters(previous)) - set(groups)), len(scope.images), scope.cursor)


Key = tuple[str, int]  # ("label", component label) or ("image", an image alone)


def grow(state: GraphState, now: float) -> Plan | None:
    """The same run as :func:`recompute` over :func:`touched` for connected components when images
    and edges were only added (no removal, every label one cluster): components only merge, so each
    label is one node of its size, and only the images whose cluster or label changes are read
    (the smaller sides of the merges, and the new images). None: not the case, recompute."""
    log = state.pending()
    if log.splits:
        return None
    near = state.known(log.images)
    if state.clusters_of(log.images - near):
        return None  # removed images, alone before: their assignment goes
    label_of = state.components_of(near)
    stats = state.label_stats(set(label_of.values()))
    if any(clusters > 1 for _, _, clusters in stats.values()):
        return None  # labels that another algorithm split into several clusters
    alone = near - label_of.keys()
    previous = state.clusters_of(alone | {first for _, first, _ in stats.values()})

    def size(k: Key) -> int:
        return stats[k[1]][0] if k[0] == "label" else 1

    def first(k: Key) -> int:
        return stats[k[1]][1] if k[0] == "label" else k[1]

    def was(k: Key) -> int | None:
        return previous.get(first(k))

    nodes = [("label", label) for label in stats] + [("image", i) for i in alone]
    node_of: dict[int, Key] = {i: ("label", label_of[i]) if i in label_of else ("image", i) for i in near}
    links = {(node_of[a], node_of[b]) for a, b in log.edges if a in node_of and b in node_of}  # once per pair of nodes
    links.difference_update((k, k) for k in nodes)
    groups = sorted(components(nodes, links), key=lambda g: (-sum(map(size, g)), min(map(first, g))))
    next_cluster, next_label = state.next_ids()
    taken: set[int] = set()
    taken_labels: set[int] = set()
    plan = Plan({}, [], {}, [], {}, [], [], 0, log.cursor)
    decided: dict[Key, tuple[int, int | None]] = {}  # node -> its group's (cluster id, label)
    for g in groups:
        total = sum(map(size, g))
        votes: Counter[int] = Counter()
        for k in g:
            if (c := was(k)) is not None:
                votes[c] += size(k)
        cid = choose(votes, taken)  # stable_ids' rule, each label weighing its images
        if cid is None:
            cid, next_cluster = next_cluster, next_cluster + 1
        taken.add(cid)
        label = None
        if total > 1:
            label = choose(Counter({k[1]: size(k) for k in g if k[0] == "label"}), taken_labels)
            if label is None:
                label, next_label = next_label, next_label + 1
            taken_labels.add(label)
            plan.sizes[cid] = total
            before = sorted(c for k in g if size(k) > 1 and (c := was(k)) is not None)
            plan.events += _growth_event(cid, before, total, g, was, size)
            plan.removed += [c for c in before if c != cid]
        plan.images_touched += total
        for k in g:
            decided[k] = (cid, label)
    rewrite = {k[1] for k, (cid, label) in decided.items() if k[0] == "label" and (was(k) != cid or k[1] != label)}
    members = state.component_members(rewrite)
    for image, old_label in [*((i, None) for i in alone), *members.items()]:
        k: Key = ("image", image) if old_label is None else ("label", old_label)
        cid, label = decided[k]
        if was(k) != cid:
            plan.changed[image] = cid
        if old_label != label:
            plan.labels[image] = label
    plan.events.sort(key=lambda e: e.cluster_id)
    plan.removed.sort()
    multi = {k: decided[k][0] for k in decided if decided[k][0] in plan.sizes}
    plan.occurrences = _grown_occurrences(state, log, multi, {k: c for k in multi if (c := was(k)) is not None},
                                          node_of, now)
    return plan


def _grown_occurrences(state: GraphState, log: Pending, multi: dict[Key, int], was: dict[Key, int],
                       node_of: dict[int, Key], now: float) -> list[tuple[int, str, int, int, int, int, int]]:
    """:func:`recompute`'s occurrence rows for the clusters (2+) ``multi`` (node -> cluster) that
    grew from nodes: a label's saved post totals (its cluster was one of 2+) plus its new posts, an
    image alone's posts, and the last day's posts of them all for the hour and day figures."""
    old = {was[k]: cid for k, cid in multi.items() if k[0] == "label"}  # each label's cluster before -> after
    alone = {k[1]: cid for k, cid in multi.items() if k[0] == "image"}
    totals = [t._replace(key=old[t.key]) for t in state.cluster_posts(old)]
    totals += [t._replace(key=multi[k]) for t in state.post_totals(log.posts)  # new posts of labelled images
               if (k := node_of.get(t.key)) is not None and k[0] == "label"]
    recent: Counter[tuple[int, str, str]] = Counter()
    for r in state.occurrence_stats(now, alone):
        totals.append(PostTotals(alone[r.image_id], r.platform, r.posts, r.first, r.last))
        recent[alone[r.image_id], r.platform, "hour"] += r.hour
        recent[alone[r.image_id], r.platform, "day"] += r.day
    for c, platform, hour, day in state.recent_posts(now, old):
        recent[old[c], platform, "hour"] += hour
        recent[old[c], platform, "day"] += day
    return [(t.key, t.platform, t.posts, t.first, t.last, recent[t.key, t.platform, "hour"],
             recent[t.key, t.platform, "day"]) for t in add_totals(totals)]


def post_totals(plan: Plan) -> dict[int, list[PostTotals]]:
    """What the state keeps of the run's occurrences: each recomputed cluster's posts, none of a gone one."""
    out: dict[int, list[PostTotals]] = {c: [] for c in [*plan.removed, *plan.sizes]}
    for t in add_totals(PostTotals(*row[:5]) for row in plan.occurrences):
        out[t.key].append(t)
    return out


def _growth_event(cid: int, before: list[int], total: int, group: set[Key], was: Callable[[Key], int | None],
                  size: Callable[[Key], int]) -> list[ClusterEvent]:
    """:func:`diff`'s event for a cluster that only gained images (``before``: the clusters of 2+ it holds)."""
    if cid not in before:
        return [ClusterEvent("created", cid, tuple(before))]
    if len(before) > 1:
        return [ClusterEvent("merged", cid, tuple(before))]
    kept = sum(size(k) for k in group if was(k) == cid)
    return [ClusterEvent("grew", cid, ())] if total > kept else []


def touched(state: GraphState, algorithm: str) -> Scope:
    """The components holding a changed image, whole. The log names every new or changed edge (an
    edge held back until its image came too, when it came): their ends' labels find every
    component a run must redo. Within those, a label stands for a connected set (the
    persisted union-find), so components need no other edge, except where an image was removed
    (the component may have split: its edges are read) or for Louvain (which weighs every edge)."""
    log = state.pending()
    pairs = log.edges
    near = state.known(log.images)
    labels = state.component_members(set(state.components_of(near).values()))
    images = near | labels.keys()
    if algorithm == "louvain":
        edges = _within(images, state.edges_of(images))
    else:
        broken = {labels[i] for i in log.splits if i in labels}
        exact = state.edges_of([i for i, label in labels.items() if label in broken]) if broken else []
        edges = [(a, b, 0.0) for a, b in pairs if a in images and b in images and a != b]
        edges += _within(images, exact) + _stars(labels, broken)
    return Scope(images, edges, labels, state.clusters_of(images | log.images), log.cursor)


def _stars(labels: dict[int, int], skip: set[int]) -> list[Edge]:
    """Edges joining each label's members (to its first): what the label says, as edges."""
    hub: dict[int, int] = {}
    out: list[Edge] = []
    for image, label in labels.items():
        if label not in skip:
            first = hub.setdefault(label, image)
            if first != image:
                out.append((first, image, 0.0))
    return out


def everything(state: GraphState) -> Scope:
    images = set(state.images())
    previous = state.clusters()
    return Scope(images, _within(images, state.matches()), state.components_of(images), previous, None)


def _within(images: set[int], matches: Iterable[Match]) -> list[Edge]:
    """Edges with both ends known (the stream may deliver an edge before an image event), no loops."""
    return [(m.a, m.b, float(m.inliers)) for m in matches if m.a != m.b and m.a in images and m.b in images]


def component_labels(scope: Scope, parts: list[set[int]], next_label: int) -> dict[int, int | None]:
    """The labels that change: a component keeps the label most of it had (the larger side of a
    merge, the larger part of a split), the others get fresh ones; an image now alone loses its label."""
    new: dict[int, int | None] = dict(stable_ids([c for c in parts if len(c) > 1], scope.labels, next_label))
    return {i: label for i in scope.images if (label := new.get(i)) != scope.labels.get(i)}


def summarize(state: GraphState, sizes: dict[int, int], occurrences: Iterable[tuple[int, str, int, int, int, int, int]],
              now: float, events: Sequence[ClusterEvent] = ()) -> list[ClusterSummary]:
    """Size in images and posts, first/last seen, growth over the last hour and day, platforms, and
    history: the recorded events, then ``events`` (this run's, recorded once it is published), for
    each cluster of ``sizes`` from its ``occurrences`` (cluster, platform, posts, first, last, hour, day)."""
    new: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        new[e.cluster_id].append({"at": int(now), "event": e.event, "clusters": list(e.clusters)})
    acc: dict[int, dict] = defaultdict(lambda: {"posts": 0, "first": None, "last": None, "hour": 0, "day": 0,
                                                "platforms": defaultdict(int)})
    for cid, platform, posts, first, last, hour, day in occurrences:
        a = acc[cid]
        a["posts"] += posts
        a["first"] = first if a["first"] is None else min(a["first"], first)
        a["last"] = last if a["last"] is None else max(a["last"], last)
        a["hour"] += hour
        a["day"] += day
        a["platforms"][platform or "unknown"] += posts
    recorded = state.cluster_histories(HISTORY, sizes.keys())
    out = []
    for cid, images in sorted(sizes.items()):
        a = acc[cid]
        out.append(ClusterSummary(cid, images, a["posts"], a["first"] or 0, a["last"] or 0, a["hour"],
                                  a["day"], dict(a["platforms"]),
                                  (recorded.get(cid, []) + new[cid])[-HISTORY:], int(now)))
    return out
