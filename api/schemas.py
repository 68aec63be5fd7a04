"""What every route answers, as pydantic models: the one representation of each record, so
``/docs`` and ``/openapi.json`` describe every response, errors included.

Bounds follow what the stores hold (Milvus INT64 ids, its VARCHAR lengths) and the pages the
routes cut, so a response that validates here is one a client can rely on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from memetrace.messages import Meta as PostMeta
from memetrace.models import ClusterSummary, Geometry

MAX_ID = 2**63 - 1  # Milvus INT64 primary keys
POSTS_PER_MATCH = 10  # posts listed per search match; posts_total says how many there are
MAX_POSTS = 100  # posts listed per image
MAX_TIMELINE = 1000  # posts listed per cluster page
MAX_PAGE = 1000  # clusters per list page, members per cluster page
MAX_HISTORY = 100  # the clusterer keeps its latest events (20 today)

Id = Annotated[int, Field(ge=0, le=MAX_ID)]
Count = Annotated[int, Field(ge=0)]
UnixTime = Annotated[int, Field(ge=-1, description="unix seconds; -1 = unknown")]
Path = Annotated[str, Field(max_length=4096, description="the file path or URL it was indexed from")]
Sort = Literal["size", "growth", "recent"]
# the bounds of the posts topic's meta (memetrace.messages), which every store keeps whole
Meta = Annotated[PostMeta, Field(description="the post's other fields (a streamed post's meta, a posts CSV's "
                                             "extra columns), as text")]


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(Schema):
    """Every error: a machine-readable code and one line saying what is wrong and how to fix it."""

    error: str = Field(max_length=64, description="machine-readable code, e.g. unknown_image, busy, too_large")
    detail: str = Field(max_length=4096, description="what is wrong and how to fix it")
    reason: str | None = Field(None, max_length=64,
                               description="download_failed only: the fetcher's reason (http_404, bad_url, ...)")


class Health(Schema):
    status: Literal["ok"] = Field("ok", description="the process serves")


class Ready(Schema):
    status: Literal["ready"] = Field("ready", description="the model is loaded and Milvus answers")


class Post(Schema):
    """One post (or indexed file) showing a stored image."""

    image_id: Id = Field(description="the stored image it shows")
    post_id: str = Field(max_length=1024)
    url: str = Field(max_length=4096, description="the image URL of the post")
    platform: str = Field(max_length=64)
    posted_at: UnixTime
    meta: Meta = Field(default_factory=dict)


class StoredImage(Schema):
    """A stored image, with its cluster and thumbnail."""

    image_id: Id = Field(description="content hash of the image's bytes")
    path: Path
    width: Count
    height: Count
    nbytes: Count = Field(description="size of the stored file in bytes")
    nb_points: Count = Field(description="SIFT keypoints stored for the geometric check")
    cluster_id: Id | None = Field(description="its cluster of 2+ images; null = no copy found yet")
    thumbnail: str = Field(max_length=256, description="path of its JPEG thumbnail on this API")


class ImageResponse(StoredImage):
    """``GET /v1/images/{id}``: the image and its posts, oldest first."""

    posts: list[Post] = Field(max_length=MAX_POSTS, description=f"the first {MAX_POSTS} posts, oldest first")
    posts_total: Count


class QueryImage(Schema):
    image_id: Id = Field(description="content hash of the uploaded bytes")
    width: Count
    height: Count
    stored: bool = Field(description="these very bytes are stored")


MAX_SIDE = 1_000_000  # pixels: far above any side the decoder accepts (MEMETRACE_MAX_PIXELS)
Pixel = Annotated[int, Field(ge=0, le=MAX_SIDE)]
BoxSchema = Annotated[tuple[Pixel, Pixel, Pixel, Pixel], Field(description="x0, y0, x1, y1 in the image file's "
                                                                          "pixels (x1, y1 excluded)")]


class MatchGeometry(Schema):
    """Where the two images share content, from the geometric check's model (query -> match)."""

    box_query: BoxSchema = Field(description="the shared region in the query image")
    box_match: BoxSchema = Field(description="the same region in the matched image")
    scale: float = Field(gt=0, le=1_000_000, allow_inf_nan=False,
                         description="size in the match / size in the query (< 1: the match shows it smaller)")
    rotation: float = Field(ge=-180, le=180, allow_inf_nan=False,
                            description="degrees counter-clockwise, query -> match")
    mirrored: bool = Field(description="the match shows the query mirrored left-right")
    inliers: Count = Field(description="keypoint pairs the model explains")

    @classmethod
    def of(cls, g: Geometry) -> MatchGeometry:
        return cls(box_query=g.box_a, box_match=g.box_b, scale=g.scale, rotation=g.rotation,
                   mirrored=g.mirrored, inliers=g.inliers)


class SearchMatch(Schema):
    image_id: Id
    inliers: Count = Field(description="keypoints the geometric check verified: the match's score")
    kind: Literal["full", "partial", "identical"] = Field(
        description="full: same content; partial: one holds a part of the other; identical: the query's bytes")
    similarity: float = Field(allow_inf_nan=False, description="best descriptor score of the candidate search "
                              "(MEMETRACE_MILVUS_METRIC)")
    mirrored: bool = Field(description="the copy is the mirror image of the query")
    geometry: MatchGeometry | None = Field(description="boxes and transform; null when the match's size is "
                                                       "no longer stored")
    cluster_id: Id | None
    path: Path | None = Field(description="null when the image row was removed since the search")
    posts: list[Post] = Field(max_length=POSTS_PER_MATCH, description="its first posts, oldest first")
    posts_total: Count


class SearchResponse(Schema):
    """``POST /v1/search`` and ``GET /v1/images/{id}/copies``: the query image and its copies, best first
    (most inliers)."""

    query: QueryImage
    matches: list[SearchMatch]


class HistoryEvent(Schema):
    model_config = ConfigDict(extra="ignore", frozen=True)  # read back from the store: tolerate added keys

    at: UnixTime = Field(description="when the clusterer recorded it")
    event: Literal["created", "grew", "shrank", "merged", "split", "dissolved"]
    clusters: list[Id] = Field(description="merged: the clusters absorbed; split: the parts; created: where from")


class ClusterItem(Schema):
    """A cluster's summary, as the clusterer published it."""

    cluster_id: Id
    images: Count
    posts: Count = Field(description="posts (streaming) and files (batch) showing one of its images")
    first_seen: UnixTime
    last_seen: UnixTime
    growth_hour: Count = Field(description="posts in the hour before the clusterer's run")
    growth_day: Count = Field(description="posts in the day before the clusterer's run")
    platforms: dict[str, Count] = Field(description="posts per platform (file: indexed files)")
    updated_at: UnixTime

    @classmethod
    def of(cls, c: ClusterSummary) -> ClusterItem:
        return cls(cluster_id=c.cluster_id, images=c.images, posts=c.posts, first_seen=c.first_seen,
                   last_seen=c.last_seen, growth_hour=c.growth_hour, growth_day=c.growth_day,
                   platforms=c.platforms, updated_at=c.updated_at)


class ClusterList(Schema):
    """``GET /v1/clusters``: one page of the clusters in ``sort`` order."""

    sort: Sort
    total: Count
    offset: Count
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)]
    clusters: list[ClusterItem] = Field(max_length=MAX_PAGE)


class ClusterDetail(ClusterItem):
    """``GET /v1/clusters/{id}``: the summary, its history, a page of members and their posts in time order."""

    history: list[HistoryEvent] = Field(max_length=MAX_HISTORY, description="latest events, oldest first")
    members_total: Count
    members: list[StoredImage] = Field(max_length=MAX_PAGE)
    timeline: list[Post] = Field(max_length=MAX_TIMELINE, description="posts of this page's members, oldest first")
    timeline_total: Count


Edit = Annotated[str, Field(max_length=16, description="the edit that made the image from its parent: crop, caption, "
                                                      "pad, collage, mirror, rotate, scale, overlay, re-encode")]
Confidence = Annotated[float, Field(ge=0.0, le=1.0)]


class TreeNode(Schema):
    """One image of a derivation tree, with its first observed post."""

    image_id: Id
    path: Path
    thumbnail: str = Field(max_length=256, description="path of its JPEG thumbnail on this API")
    parent: Id | None = Field(description="the image it was most likely made from; null = a root (an origin)")
    edit: Edit
    confidence: Confidence
    first_post: Post | None = Field(description="its earliest observed post; null = none known")
    author: str = Field("", max_length=256, description="author of the first post")


class TreeEdge(Schema):
    parent: Id
    child: Id
    edit: Edit
    confidence: Confidence


class ClusterTree(Schema):
    """A cluster's derivation forest: nodes origin first, then by first post; edges parent -> child."""

    cluster_id: Id
    nodes_total: Count
    nodes: list[TreeNode] = Field(max_length=MAX_PAGE)
    edges: list[TreeEdge] = Field(max_length=MAX_PAGE)
