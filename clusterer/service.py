"""One reclustering run: matches → communities with stable ids → history, per-cluster stats → published.

The same run serves ``memetrace index`` (batch) and the clusterer service (every N seconds), on the
clusterer's :class:`~memetrace.clusterer.state.GraphState`::

    state.images + state.matches ─► communities ─► stable_ids(previous) ─► diff ─► events
                                                                                │
    state.posts (posts and files) ─► occurrence stats per cluster ─► summaries ◄┘
                                                                        │
    state.clusters, history ◄── saved (changes only) ──┬── published ──► the API's store
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from memetrace.clusterer.graph import build_graph, communities, stable_ids
from memetrace.clusterer.history import ClusterEvent, diff, multi_image_clusters
from memetrace.clusterer.state import GraphState
from memetrace.models import ClusterSummary

#: publish(changed assignment, summaries, removed cluster ids), e.g. ClusterBoard.publish
Publish = Callable[[dict[int, int], list[ClusterSummary], list[int]], None]

HISTORY = 20  # latest events per cluster in its summary


@dataclass
class ClusterRun:
    at: int
    seconds: float
    clusters: int  # of 2+ images
    images_clustered: int
    largest: int
    events: list[ClusterEvent] = field(default_factory=list)
    summaries: list[ClusterSummary] = field(default_factory=list)

    @property
    def new_clusters(self) -> int:
        return sum(e.event == "created" for e in self.events)

    def fastest_growing(self, n: int) -> list[ClusterSummary]:
        return sorted(self.summaries, key=ClusterSummary.growth_rank)[:n]


def recluster(state: GraphState, algorithm: str, publish: Publish | None = None, now: float | None = None,
              publish_all: bool = False) -> ClusterRun:
    """Recompute the clusters; ``publish`` gets the assignments that changed (all if ``publish_all``)."""
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    previous = state.clusters()
    assignment = stable_ids(communities(build_graph(state.images(), state.matches()), algorithm), previous)
    changed = {i: c for i, c in assignment.items() if previous.get(i) != c}  # images never leave the graph
    events = diff(previous, assignment)
    groups = multi_image_clusters(assignment)
    summaries = summarize(state, groups, now, events)
    if publish is not None:  # before the state moves on: a failed publish is redone by the next run
        publish(assignment if publish_all else changed, summaries,
                sorted(set(multi_image_clusters(previous)) - set(groups)))
    state.save_run(changed, int(now), [e.as_row() for e in events])  # only now: a failed run records no event
    return ClusterRun(int(now), time.perf_counter() - t0, len(groups), sum(map(len, groups.values())),
                      max(map(len, groups.values()), default=0), events, summaries)


def summarize(state: GraphState, groups: dict[int, set[int]], now: float,
              events: Sequence[ClusterEvent] = ()) -> list[ClusterSummary]:
    """Size in images and posts, first/last seen, growth over the last hour and day, platforms, and
    history: the recorded events, then ``events`` (this run's, recorded once it is published)."""
    new: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        new[e.cluster_id].append({"at": int(now), "event": e.event, "clusters": list(e.clusters)})
    cluster_of = {image: cid for cid, images in groups.items() for image in images}
    acc: dict[int, dict] = defaultdict(lambda: {"posts": 0, "first": None, "last": None, "hour": 0, "day": 0,
                                                "platforms": defaultdict(int)})
    for image, platform, posts, first, last, hour, day in state.occurrence_stats(now):
        cid = cluster_of.get(image)
        if cid is None:
            continue
        a = acc[cid]
        a["posts"] += posts
        a["first"] = first if a["first"] is None else min(a["first"], first)
        a["last"] = last if a["last"] is None else max(a["last"], last)
        a["hour"] += hour
        a["day"] += day
        a["platforms"][platform or "unknown"] += posts
    recorded = state.cluster_histories(HISTORY)
    out = []
    for cid, images in sorted(groups.items()):
        a = acc[cid]
        out.append(ClusterSummary(cid, len(images), a["posts"], a["first"] or 0, a["last"] or 0, a["hour"],
                                  a["day"], dict(a["platforms"]),
                                  (recorded.get(cid, []) + new[cid])[-HISTORY:], int(now)))
    return out
