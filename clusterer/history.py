"""How clusters changed between two runs: the events of each cluster's history.

Only clusters of 2+ images count (a singleton is an image nobody copied yet)::

    previous run            this run               events
    {A: 1,2}                {A: 1,2,3}             A grew
    {A: 1,2} {B: 3,4}       {A: 1,2,3,4}           A merged [A, B]        (A was the larger)
    {A: 1,2,3} ...          {A: 1,2} {C: 3,4}      A split [A, C], C created [A]
    {A: 1,2,3} {B: 4,5,6}   {A: 1,2} {B: 4,5}      A split [A, C], B split [B, C],
                            {C: 3,6}               C created [A, B]
    -                       {D: 5,6}               D created []
    {E: 7,8}                -                      E dissolved
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterEvent:
    event: str  # created | grew | shrank | merged | split | dissolved
    cluster_id: int
    clusters: tuple[int, ...]  # merged: the clusters it absorbed; split: the parts; created: where from

    def as_row(self) -> tuple[str, int, tuple[int, ...]]:
        return self.event, self.cluster_id, self.clusters


def multi_image_clusters(assignment: dict[int, int]) -> dict[int, set[int]]:
    """cluster id -> images, for clusters of 2+ images."""
    groups: dict[int, set[int]] = defaultdict(set)
    for image, cid in assignment.items():
        groups[cid].add(image)
    return {cid: images for cid, images in groups.items() if len(images) > 1}


def diff(previous: dict[int, int], current: dict[int, int]) -> list[ClusterEvent]:
    """Events turning the ``previous`` image -> cluster assignment into ``current``."""
    before, after = multi_image_clusters(previous), multi_image_clusters(current)
    parts = {cid: tuple(sorted({current[i] for i in images if current.get(i) in after}))
             for cid, images in before.items()}
    events: list[ClusterEvent] = []
    for cid in sorted(after):
        members = after[cid]
        sources = tuple(sorted({previous[i] for i in members if previous.get(i) in before}))
        if cid not in before:  # a new id, even when made of parts of several clusters
            events.append(ClusterEvent("created", cid, sources))
        elif len(sources) > 1:
            events.append(ClusterEvent("merged", cid, sources))
        elif members != before[cid] and len(parts[cid]) < 2:  # a split is one event, not also "shrank"
            events.append(ClusterEvent("grew" if len(members) >= len(before[cid]) else "shrank", cid, ()))
    for cid in sorted(before):
        if len(parts[cid]) > 1:
            events.append(ClusterEvent("split", cid, parts[cid]))
        elif not parts[cid]:
            events.append(ClusterEvent("dissolved", cid, ()))
    return events
