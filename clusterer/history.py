"""How clusters changed between two runs: the events of each cluster's history.

Only clusters of 2+ images count (a singleton is an image nobody copied yet)::

    previous run            this run               events
    {A: 1,2}                {A: 1,2,3}             A grew
    {A: 1,2} {B: 3,4}       {A: 1,2,3,4}           A merged [A, B]        (A was the larger)
    {A: 1,2,3} ...          {A: 1,2} {C: 3,4}      A split [A, C], C created [A]
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
    events: list[ClusterEvent] = []
    for cid in sorted(after):
        members = after[cid]
        sources = tuple(sorted({previous[i] for i in members if previous.get(i) in before}))
        if len(sources) > 1:
            events.append(ClusterEvent("merged", cid, sources))
        elif cid not in before:
            events.append(ClusterEvent("created", cid, sources))
        elif members != before[cid]:
            events.append(ClusterEvent("grew" if len(members) >= len(before[cid]) else "shrank", cid, ()))
    for cid in sorted(before):
        parts = tuple(sorted({current[i] for i in before[cid] if current.get(i) in after}))
        if len(parts) > 1:
            events.append(ClusterEvent("split", cid, parts))
        elif not parts:
            events.append(ClusterEvent("dissolved", cid, ()))
    return events
