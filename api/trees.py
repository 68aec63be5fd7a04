"""``GET /v1/clusters/{id}/tree``: a cluster's derivation tree with each image's first post."""

from __future__ import annotations

from collections.abc import Callable

from memetrace.api.records import post_of
from memetrace.api.schemas import MAX_PAGE, ClusterTree, TreeEdge, TreeNode
from memetrace.models import Derivation, ImageRecord
from memetrace.occurrence_log import OccurrenceLog
from memetrace.tree_store import earliest_posts

def cluster_tree(cluster_id: int, tree: list[Derivation], rows: dict[int, ImageRecord], log: OccurrenceLog,
                 thumbnail_url: Callable[[int], str]) -> ClusterTree:
    """The tree's nodes (origin first, then by first post; the first MAX_PAGE) and their edges."""
    ids = [d.image_id for d in tree]
    first = earliest_posts(log.occurrences_of(ids))
    order = sorted(tree, key=lambda d: (d.parent is not None, first[d.image_id].posted_at if d.image_id in first
                                        else 2**62, d.image_id))[:MAX_PAGE]
    nodes = []
    for d in order:
        post = first.get(d.image_id)
        nodes.append(TreeNode(
            image_id=d.image_id, path=rows[d.image_id].path if d.image_id in rows else "",
            thumbnail=thumbnail_url(d.image_id), parent=d.parent, edit=d.edit, confidence=d.confidence,
            first_post=None if post is None else post_of(post),
            author="" if post is None else post.author))
    shown = {n.image_id for n in nodes}
    edges = [TreeEdge(parent=d.parent, child=d.image_id, edit=d.edit, confidence=d.confidence)
             for d in order if d.parent is not None and d.parent in shown]
    return ClusterTree(cluster_id=cluster_id, nodes_total=len(tree), nodes=nodes, edges=edges)
