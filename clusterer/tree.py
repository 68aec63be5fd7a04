"""Derivation forests: in each cluster, which image was made from which (docs/propagation.md).

Pure functions over a cluster's members, each member's earliest observed post and the verified
matches' geometry (:class:`~memetrace.models.Geometry`). Every match gives two directed edges,
p -> c ("c was made from p"), weighted by how alike the two images are (more verified keypoints:
fewer edits apart) plus how well the cues say p came first:

- **time**: the earliest observed posts (a crawler misses posts, so this is soft, never a rule);
- **scale**: an edit shrinks or keeps the size of what it copies (scale, collage, screenshot),
  never enlarges it: the image showing the shared content smaller is the copy;
- **containment**: when one image holds all of the other (its box covers a larger share of
  it), the other is a crop of it if the holder's extra area has content of its own (its
  keypoints unmatched), or the holder is a caption, frame or pad of it if that area is flat
  (keypoints are only kept on textured content, so flat bands and pads have none);
- **additions**: between two full copies, the one with unmatched keypoints of its own carries an
  added text or sticker: it is the copy.

The time counts both ways; the geometry only vetoes (an edge it says runs backwards loses weight,
one it confirms gains none): it tells a pair's direction, not which neighbour is the parent.
The forest is the optimum branching (Edmonds) of those edges plus a virtual root: every member
gets the parent that maximises the total weight, the cluster's origin none; a member whose chosen
parent's own parent explains it almost as well goes to the one whose edit its thumbnail carries
(:func:`inheritance`), or, where the thumbnails cannot tell, hangs under that older image
(:func:`closest_ancestor`). An edge's confidence is how far its weight beats the member's next
best choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import networkx as nx
import numpy as np

from memetrace.models import Derivation, Geometry, Match

ROOT = -1  # the virtual root's node id (image ids are >= 0)
CONTAINED = math.log(1.25)  # one box covers this much more of its image: a containment (direction cue)
FRAMED = math.log(1.1)  # enough to name the edit a crop, pad or caption
#: the two candidates differ on a pixel when their warped thumbnails are at least this far apart
#: (mean over channels, 0..1): under it JPEG noise and resampling, not an edit
DIFFER_MIN = 8 / 255
DIFFER_SHARE = 0.1  # the inheritance cue reads the tenth of pixels where the two candidates differ most
EDITS = ("crop", "caption", "pad", "collage", "mirror", "rotate", "scale", "overlay", "re-encode")


@dataclass(frozen=True)
class TreeConfig:
    """Weights of the cues (log-odds-like units; docs/propagation.md says how they were set)."""

    time_weight: float = 3.0
    # a gap of this many hours counts ~3/4 of the time weight: the order of the first posts tells,
    # not the size of the gap (3 min scored better than 1-6 h on two seeds, docs/propagation.md)
    time_scale_h: float = 0.05
    scale_weight: float = 3.0
    containment_weight: float = 3.0
    flat_cover: float = 0.85  # a holder covered at least this much has a flat (caption, pad) extra area
    addition_weight: float = 1.5
    similarity_weight: float = 6.0  # per log of verified keypoints
    distance_weight: float = 60.0  # per unit of appearance distance (mean absolute difference, 0..1)
    root_weight: float = -10.0  # a member is a root when every way in scores lower: merged clusters get several
    # a member hangs under its chosen parent's parent when that one's edge is at most this much
    # weaker (closest_ancestor); 0.5 ~ 8 % fewer inliers: of 0.25 / 0.5 / 1 the best in sum over three
    # seeds (docs/propagation.md)
    ancestor_margin: float = 0.5
    # a member whose chosen parent and that parent's parent are within this much of each other as its
    # source is hung by the inheritance cue (inheritance), where the thumbnails can tell: 1.5 ~ 28 %
    # more inliers, the span in which keypoints and distance cannot tell a copy from its source
    # (0.75 / 1.5 / 3: 1.5 best in sum over three seeds, docs/propagation.md)
    inherit_margin: float = 1.5
    # the share of the pixels where the two candidates differ on which the member is closer to the
    # parent than to the grandparent, from which it is taken to have inherited the parent's edit
    inherit_threshold: float = 0.5
    # a cluster with at most this many pairs has every pair verified for its tree (tree_update.py):
    # 435 = clusters of up to 30 images, a few seconds of verification
    max_verified_pairs: int = 435


@dataclass(frozen=True)
class Seen:
    """A directed pair p -> c as the cues read it."""

    inliers: int
    scale: float  # size in c / size in p of the shared content
    area_p: float  # share of p's canvas the shared region covers
    area_c: float
    cover_p: float  # share of p's keypoints near a verified point
    cover_c: float
    mirrored: bool
    rotation: float

    @classmethod
    def of(cls, g: Geometry) -> Seen:
        return cls(g.inliers, g.scale, _area(g.box_a, g.size_a), _area(g.box_b, g.size_b),
                   g.cover_a, g.cover_b, g.mirrored, g.rotation)

    @property
    def containment(self) -> float:
        """log of how much more of c than of p the shared region covers (> 0: c lies inside p)."""
        return math.log(max(self.area_c, 1e-3) / max(self.area_p, 1e-3))


def _area(box: tuple[int, int, int, int], size: tuple[int, int]) -> float:
    if size[0] <= 0 or size[1] <= 0:
        return 1.0
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1]) / (size[0] * size[1])


def _clip(x: float) -> float:
    return max(-1.0, min(1.0, x))


def time_cue(dt_h: float | None, cfg: TreeConfig) -> float:
    """The earlier first post is the source (antisymmetric; 0 when either time is unknown)."""
    return 0.0 if dt_h is None else cfg.time_weight * math.tanh(dt_h / cfg.time_scale_h)


def geometry_cue(e: Seen, cfg: TreeConfig) -> float:
    """How strongly the match's geometry says p -> c rather than c -> p (antisymmetric)."""
    score = 0.0
    ls = math.log(max(e.scale, 1e-3))
    if abs(ls) > 0.07:
        score -= cfg.scale_weight * _clip(ls / 0.2)
    lc = e.containment
    if abs(lc) > CONTAINED and abs(ls) <= 0.07:
        # the holder (outer image): p when c lies inside p; its extra area textured -> crop (p first),
        # flat -> caption/pad (the holder is the copy)
        holder_cover = e.cover_p if lc > 0 else e.cover_c
        textured = _clip((cfg.flat_cover - holder_cover) / 0.1)
        score += cfg.containment_weight * textured * (1.0 if lc > 0 else -1.0)
    elif abs(lc) <= 0.05 and abs(e.rotation) < 1.0 and min(e.cover_p, e.cover_c) >= 0:
        score += cfg.addition_weight * _clip((e.cover_p - e.cover_c) / 0.05)
    return score


def edit_of(e: Seen) -> str:
    """The edit kind that best explains c from p."""
    if e.mirrored:
        return "mirror"
    lc, shrunk = e.containment, e.scale < 0.93
    if lc > FRAMED and not shrunk:
        return "crop"
    if lc < -FRAMED:
        if shrunk:
            return "collage"
        return "pad" if e.cover_c >= 0.97 else "caption"
    if abs(e.rotation) > 2.0:
        return "rotate"
    if shrunk:
        return "scale"
    return "overlay" if e.cover_p - e.cover_c > 0.03 else "re-encode"


def oriented(m: Match) -> tuple[Seen, Seen] | None:
    """(a -> b, b -> a) as the cues read them; None without geometry."""
    if m.geometry is None:
        return None
    return Seen.of(m.geometry), Seen.of(m.geometry.swapped())


#: a member's thumbnail (RGB, uint8) by image id, None where not stored
Thumbnails = Callable[[int], np.ndarray | None]


@dataclass(frozen=True)
class Looks:
    """The thumbnails and the matches' geometry the inheritance cue reads: a thumbnail is asked for
    (``thumbnail``, which the caller may memoize) only when a near tie needs it."""

    thumbnail: Thumbnails
    geometry: Mapping[tuple[int, int], Geometry]  # (p, c) -> the match's geometry read p -> c

    def reading(self, c: int, p: int, up: int) -> float | None:
        """:func:`inheritance` of c from p rather than from up; None where a thumbnail or geometry is missing."""
        g_p, g_up = self.geometry.get((p, c)), self.geometry.get((up, c))
        if g_p is None or g_up is None:
            return None
        t_c, t_p, t_up = self.thumbnail(c), self.thumbnail(p), self.thumbnail(up)
        if t_c is None or t_p is None or t_up is None:
            return None
        return inheritance(t_c, t_p, g_p, t_up, g_up)


def forest(members: Sequence[int], first_seen: Mapping[int, int], matches: Iterable[Match],
           cfg: TreeConfig = TreeConfig(), distance: Mapping[tuple[int, int], float] | None = None,
           thumbnail: Thumbnails | None = None) -> dict[int, Derivation]:
    """Each member's derivation; ``first_seen``: earliest observed post (unix s), absent = unknown;
    ``distance``: (a, b) -> :func:`appearance_distance` of a match, where known; ``thumbnail``: reads
    a member's thumbnail for the inheritance cue, asked only for near ties (memoize it: a member may
    be in several).
    Matches without geometry count by similarity and time only; those leaving the members are ignored."""
    inside = set(members)
    g = nx.DiGraph()
    g.add_nodes_from(inside)
    seen: dict[tuple[int, int], Seen] = {}
    geometry: dict[tuple[int, int], Geometry] = {}
    kept = [m for m in matches if m.a in inside and m.b in inside and m.a != m.b]
    # similarity relative to each child's most similar neighbour: choosing a parent compares
    # neighbours, and a member's cost of being a root is then its direction cues alone
    distance = distance or {}
    sim = {(m.a, m.b): cfg.similarity_weight * math.log(max(m.inliers, 1))
           - cfg.distance_weight * max(0.0, distance.get((m.a, m.b), 0.0)) for m in kept}
    best: dict[int, float] = {}
    for (a, b), w in sim.items():
        best[a], best[b] = max(best.get(a, w), w), max(best.get(b, w), w)
    for m in kept:
        pair = oriented(m)
        for (p, c), e in zip(((m.a, m.b), (m.b, m.a)), pair or (None, None)):
            dt = (first_seen[c] - first_seen[p]) / 3600 if p in first_seen and c in first_seen else None
            t, geo = time_cue(dt, cfg), (geometry_cue(e, cfg) if e is not None else 0.0)
            # the geometry only vetoes: it tells a pair's direction, not which neighbour is the parent
            # (a sibling that added a caption "holds" the child as a crop's source would; rewarding
            # that made siblings win over the true parent, docs/propagation.md)
            g.add_edge(p, c, weight=sim[m.a, m.b] - best[c] + t + min(0.0, geo), direction=t + geo)
            if e is not None and m.geometry is not None:
                seen[p, c] = e
                geometry[p, c] = m.geometry if p == m.a else m.geometry.swapped()
    for i in inside:
        g.add_edge(ROOT, i, weight=cfg.root_weight)
    tree = nx.maximum_spanning_arborescence(g, attr="weight", preserve_attrs=True)
    chosen = {c: next(iter(tree.predecessors(c))) for c in inside}
    looks = Looks(thumbnail, geometry) if thumbnail is not None else None
    out: dict[int, Derivation] = {}
    for c in sorted(inside):
        p = closest_ancestor(g, chosen, c, cfg, looks)
        if p == ROOT:  # as sure as no member looks like its source
            against = [g[q][c]["direction"] for q in g.predecessors(c) if q != ROOT]
            out[c] = Derivation(c, None, "", _sigmoid(-max(against, default=-10.0)))
            continue
        rivals = [g[q][c]["weight"] for q in g.predecessors(c) if q not in (p, ROOT)] + [g[c][p]["weight"]]
        conf = _sigmoid(g[p][c]["weight"] - max(rivals))
        e = seen.get((p, c))
        out[c] = Derivation(c, p, edit_of(e) if e else "re-encode", conf)
    return out


def closest_ancestor(g: nx.DiGraph, chosen: Mapping[int, int], c: int, cfg: TreeConfig,
                     looks: Looks | None = None) -> int:
    """c's parent: its chosen parent p, or p's own parent ``up`` when that explains c as well.

    A near-identical copy of the true parent (its re-encode, recolour, flip) matches the child as
    well as the parent does. Where the two edges into c are within ``cfg.inherit_margin`` and the
    thumbnails can tell (``looks``, :func:`inheritance`), c goes to the one whose edit it carries;
    otherwise to up when it explains c within ``cfg.ancestor_margin``: between an image and its own
    parent, both able to explain the child, the older is the likelier source (copies are made from
    the early, widely seen posts). Read on the branching as chosen, so the result does not depend on
    the order the members are visited; every member moves up its own chosen branch, so no cycle can form."""
    p = chosen[c]
    if p == ROOT or chosen[p] == ROOT or not g.has_edge(chosen[p], c):
        return p
    up = chosen[p]
    w_p, w_up = g[p][c]["weight"], g[up][c]["weight"]
    if looks is not None and abs(w_p - w_up) <= cfg.inherit_margin:
        reading = looks.reading(c, p, up)
        if reading is not None:
            return p if reading >= cfg.inherit_threshold else up
    return up if w_up >= w_p - cfg.ancestor_margin else p


def _sigmoid(x: float) -> float:
    return round(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x)))), 3)


def _laid_onto(thumb_a: np.ndarray, thumb_b: np.ndarray, g: Geometry) -> tuple[np.ndarray, np.ndarray] | None:
    """a's thumbnail warped onto b's by the match's transform (a -> b), and the mask of b's pixels
    it covers inside the shared box; None without sizes or with under 16 such pixels."""
    size_a, size_b = g.size_a, g.size_b
    if min(*size_a, *size_b) <= 0:
        return None
    fa, fb = thumb_a.shape[1] / size_a[0], thumb_b.shape[1] / size_b[0]
    theta = math.radians(-g.rotation)
    rot = g.scale * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    if g.mirrored:
        rot = rot @ np.array([[-1.0, 0.0], [0.0, 1.0]])
    ca = np.array([(g.box_a[0] + g.box_a[2]) / 2, (g.box_a[1] + g.box_a[3]) / 2]) * fa
    cb = np.array([(g.box_b[0] + g.box_b[2]) / 2, (g.box_b[1] + g.box_b[3]) / 2]) * fb
    lin = rot * (fb / fa)
    model = np.hstack([lin, (cb - lin @ ca)[:, None]]).astype(np.float32)
    h, w = thumb_b.shape[:2]
    warped = cv2.warpAffine(thumb_a, model, (w, h), flags=cv2.INTER_AREA)
    mask = cv2.warpAffine(np.full(thumb_a.shape[:2], 255, np.uint8), model, (w, h), flags=cv2.INTER_NEAREST)
    x0, y0, x1, y1 = (int(round(v * fb)) for v in g.box_b)
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    inside &= cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
    if inside.sum() < 16:
        return None
    return warped, inside


def _smooth(thumb: np.ndarray) -> np.ndarray:
    """Blurred, as float: a pixel's JPEG and resampling noise damped before comparing."""
    return cv2.GaussianBlur(thumb, (3, 3), 0).astype(np.float32)


def appearance_distance(thumb_a: np.ndarray, thumb_b: np.ndarray, g: Geometry) -> float:
    """Mean absolute difference (0..1) of a's thumbnail laid onto b's by the match's transform,
    over the shared region: low for a parent and its direct copy, higher across a sibling's edit."""
    laid = _laid_onto(thumb_a, thumb_b, g)
    if laid is None:
        return -1.0
    warped, inside = laid
    diff = np.abs(_smooth(warped) - _smooth(thumb_b))
    return float(diff[inside].mean() / 255.0)


def inheritance(thumb_c: np.ndarray, thumb_p: np.ndarray, g_p: Geometry, thumb_up: np.ndarray,
                g_up: Geometry) -> float | None:
    """How far c carries p's own edit rather than looking like p's source ``up``: both laid onto c
    (``g_p``: p -> c, ``g_up``: up -> c), on the tenth of the pixels they both cover where they differ
    most (and by at least :data:`DIFFER_MIN`: where p's edit is), the share on which c is closer to p.
    1: c shows p's edit (p's child), 0: c shows up's pixels there (up's child, p's sibling).
    None where they cover no common pixels or nowhere differ."""
    laid_p, laid_up = _laid_onto(thumb_p, thumb_c, g_p), _laid_onto(thumb_up, thumb_c, g_up)
    if laid_p is None or laid_up is None:
        return None
    (warp_p, in_p), (warp_up, in_up) = laid_p, laid_up
    both = in_p & in_up
    if not both.any():
        return None
    sp, su, sc = _smooth(warp_p), _smooth(warp_up), _smooth(thumb_c)
    apart = np.abs(sp - su).mean(axis=2) / 255.0
    cut = max(float(np.quantile(apart[both], 1.0 - DIFFER_SHARE)), DIFFER_MIN)
    where = both & (apart >= cut)
    if not where.any():
        return None
    nearer_p = np.abs(sc - sp).mean(axis=2) < np.abs(sc - su).mean(axis=2)
    return float(nearer_p[where].mean())


def depth(tree: Mapping[int, Derivation]) -> int:
    """Edges on the deepest branch (0: no image has a parent)."""
    memo: dict[int, int] = {}

    def level(i: int) -> int:
        if i not in memo:
            memo[i] = 0  # a cycle (never built by forest) stops here
            p = tree[i].parent if i in tree else None
            memo[i] = 0 if p is None or p not in tree else level(p) + 1
        return memo[i]

    return max((level(i) for i in tree), default=0)


def copy_delays(first_seen: Mapping[int, int], ns: Sequence[int]) -> dict[int, int]:
    """Seconds from the first image's first post to the n-th image's, for each n of ``ns`` reached."""
    times = sorted(first_seen.values())
    return {n: times[n - 1] - times[0] for n in ns if 1 < n <= len(times)}
