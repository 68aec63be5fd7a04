"""The ASGI app: routes, auth, readiness and metrics wired onto one set of :class:`~memetrace.components.Components`."""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path as FsPath
from typing import Annotated

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from memetrace.api.auth import COOKIE, BearerCredentials, TokenCheck
from memetrace.api.docs import install_docs
from memetrace.api.errors import ApiError, error_responses, features_missing, install_error_handlers, unknown_image
from memetrace.api.explain import explain_links
from memetrace.api.gallery import gallery_page, script
from memetrace.api.limits import ApiLimits, BodyDeadline, SearchPool
from memetrace.api.middleware import ObserveRequests
from memetrace.api.records import posts_of, sorted_summaries, stored_image
from memetrace.api.schemas import (MAX_ID, MAX_PAGE, MAX_POSTS, MAX_TIMELINE, ClusterDetail, ClusterItem, ClusterTree,
                                   ClusterList, Health, HistoryEvent, ImageResponse, Ready, SearchResponse, Sort)
from memetrace.api.search import OPENAPI_BODY, read_query_image, search_image, search_stored
from memetrace.api.trees import cluster_tree as tree_of
from memetrace.tree_html import tree_section
from memetrace.api.warmup import Warmup
from memetrace.fetch import Fetcher, FetchPolicy
from memetrace.matcher.explain import png, side_of_stored
from memetrace.matcher.stored import FeaturesMissing, NotStored
from memetrace.matcher.query import CopyFinder
from memetrace.matcher.verify import VerifyConfig
from memetrace.imageio import DecodeLimits
from memetrace.components import Components
from memetrace.api.metrics import ApiMetrics

ImageId = Annotated[int, Path(ge=0, le=MAX_ID, description="image id (content hash), as in search results")]
ClusterId = Annotated[int, Path(ge=0, le=MAX_ID)]
MILVUS_PING_S = 3.0
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0)]
V1_ERRORS = (401, 422, 503)  # every /v1 route: the token, its parameters, readiness
# the gallery loads only its own thumbnails, inline CSS and its script, which talks only to this API
GALLERY_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'self'; "
               "connect-src 'self'; base-uri 'none'; form-action 'self'")
# an original served back: never run as a page, whatever its bytes claim
FILE_HEADERS = {"Content-Security-Policy": "default-src 'none'; sandbox", "X-Content-Type-Options": "nosniff",
                "Cache-Control": "private, max-age=3600"}

DESCRIPTION = """Find every copy of an image among those memetrace indexed, and browse the clusters.

When `MEMETRACE_API_TOKEN` is set, `/v1/*` and `/gallery` need `Authorization: Bearer <token>`
(browsers: open `/gallery?token=<token>` once; a cookie then carries it for GET requests)."""


def create_app(ctx: Components, registry: CollectorRegistry | None = None) -> FastAPI:
    """The API over ``ctx``'s Milvus and feature store; ``registry`` gets the API metrics (default: a new one)."""
    s = ctx.settings
    metrics = ApiMetrics(registry or CollectorRegistry())
    warmup = Warmup(ctx)
    finder = CopyFinder(ctx)
    # one fetcher per process: its per-host limits are then global; a URL is held to the upload limit
    fetcher = Fetcher(replace(FetchPolicy.from_settings(s), max_bytes=min(s.max_file_bytes, s.api_max_upload_bytes)))
    downloads = CapacityLimiter(fetcher.policy.max_in_flight)
    limits = ApiLimits.from_settings(s)
    searches = SearchPool(limits.search_threads, limits.search_queue)
    probes = CapacityLimiter(2)  # /readyz's Milvus ping: never behind the shared pool
    auth = TokenCheck(s.api_token)
    explain_limits, explain_config = DecodeLimits.from_settings(s), VerifyConfig.from_settings(s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        warmup.start()
        yield
        warmup.stop()

    def require_ready() -> None:
        if problem := warmup.problem():
            raise ApiError(503, "not_ready", f"{problem}; retry shortly (GET /readyz says when)",
                           {"Retry-After": "5"})

    app = FastAPI(title="memetrace", description=DESCRIPTION, version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # install_docs: served without a CDN
    install_docs(app)
    app.state.limits = limits  # read by server_for: uvicorn's own limits
    app.state.searches = searches  # its counters: places held now, of how many
    install_error_handlers(app, s)
    app.add_middleware(BodyDeadline, timeout_s=limits.body_timeout_s)
    app.add_middleware(ObserveRequests, metrics=metrics)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth.dependency()), Depends(require_ready)])

    def thumbnail_url(request: Request, image_id: int) -> str:
        return request.url_for("image_thumbnail", image_id=image_id).path

    @v1.post("/search", tags=["search"], openapi_extra=OPENAPI_BODY,
             responses=error_responses(400, 408, 413, 415, *V1_ERRORS))
    async def search(request: Request) -> SearchResponse:
        """Copies of an image: multipart field `image` (a file), or JSON `{"url": "https://..."}`.

        Matches come best first (most `inliers`, the keypoints the geometric check verified); `kind` is full,
        partial, or identical (these very bytes are stored). 503 `busy` (with Retry-After) when
        MEMETRACE_API_SEARCH_CONCURRENCY searches run and MEMETRACE_API_SEARCH_QUEUE more wait or
        are being uploaded."""
        with searches.place() as place:
            data = await read_query_image(request, s.api_max_upload_bytes, fetcher, downloads, place)
            place.take()  # a URL search downloads without one (its download has limits of its own)
            return await searches.run(search_image, finder, ctx, metrics, data)

    @v1.get("/images/{image_id}", tags=["images"], responses=error_responses(404, *V1_ERRORS))
    def image(request: Request, image_id: ImageId) -> ImageResponse:
        """A stored image: path, size, keypoints, cluster, and its posts (oldest first)."""
        row = ctx.index.get([image_id]).get(image_id)
        if row is None:
            raise unknown_image(image_id)
        posts = posts_of(ctx.occurrences, [image_id])
        cluster = ctx.board.clusters_of([image_id]).get(image_id)
        record = stored_image(row, cluster, thumbnail_url(request, image_id))
        return ImageResponse(**dict(record), posts=posts[:MAX_POSTS], posts_total=len(posts))

    @v1.get("/images/{image_id}/copies", tags=["search"], responses=error_responses(404, 409, *V1_ERRORS))
    async def copies(image_id: ImageId) -> SearchResponse:
        """Copies of a stored image (itself left out), best first, searched and verified with what is stored of
        it: its global and content-box vectors and its keypoints, nothing embedded or extracted again. An upload
        of the same file to `POST /v1/search` also searches with grid windows and may find a few more partial
        copies. 409 `features_missing` when its keypoints are gone; 503 `busy` as a search."""
        with searches.place() as place:
            place.take()
            return await searches.run(search_stored, finder, ctx, metrics, image_id)

    @v1.get("/images/{image_id}/thumbnail", name="image_thumbnail", tags=["images"], response_class=Response,
            responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "a JPEG of at most 160 pixels a side"},
                       **error_responses(404, *V1_ERRORS)})
    def thumbnail(image_id: ImageId) -> Response:
        """The stored image's JPEG thumbnail."""
        data = ctx.features.get_thumbnail(image_id)
        if data is None:
            raise ApiError(404, "no_thumbnail", f"the feature store has no thumbnail for image {image_id} "
                                                "(unknown id, or indexed without one)")
        # an image id is a hash of its bytes: the thumbnail never changes
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400, immutable"})

    @v1.get("/explain", tags=["images"], response_class=Response,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "the pair side by side, inlier lines and shared boxes drawn; "
                                            "header X-Memetrace-Match: true, or false (drawn all the same)"},
                       **error_responses(404, *V1_ERRORS)})
    def explain(a: Annotated[int, Query(ge=0, le=MAX_ID)], b: Annotated[int, Query(ge=0, le=MAX_ID)]) -> Response:
        """Why two stored images match (ids as in search results): a PNG of both with the verified keypoint
        pairs joined and the shared region boxed."""
        try:
            sides = [side_of_stored(ctx, i, explain_limits) for i in (a, b)]
        except NotStored as exc:
            raise unknown_image(exc) from None
        except FeaturesMissing as exc:
            raise features_missing(exc) from None
        data, e = png(*sides, explain_config, s.thumbnail_side)
        return Response(data, media_type="image/png",
                        headers={"X-Memetrace-Match": "true" if e.geometry else "false",
                                 "Cache-Control": "private, max-age=3600"})

    @v1.get("/images/{image_id}/file", tags=["images"], response_class=Response,
            responses={200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "the indexed file"},
                       307: {"description": "to the URL the image was downloaded from"},
                       **error_responses(404, *V1_ERRORS)})
    def original(image_id: ImageId) -> Response:
        """The full-size image: the indexed local file, or a redirect to the URL it came from."""
        row = ctx.index.get([image_id]).get(image_id)
        if row is None:
            raise unknown_image(image_id)
        if row.path.startswith(("http://", "https://")):
            return RedirectResponse(row.path, status_code=307)
        path = FsPath(row.path)
        if not path.is_absolute() or not path.is_file():
            raise ApiError(404, "no_file", f"image {image_id}'s file {row.path} is not readable by this server "
                                           "(moved, deleted, or indexed on another machine)")
        media = mimetypes.guess_type(path.name)[0] or ""
        return FileResponse(path, media_type=media if media.startswith("image/") else "application/octet-stream",
                            headers=FILE_HEADERS)

    @v1.get("/clusters", tags=["clusters"], responses=error_responses(*V1_ERRORS))
    def clusters(sort: Sort = "size", limit: PageSize = 50, offset: Offset = 0) -> ClusterList:
        """Clusters of 2+ images: `size` (most images), `growth` (most posts in the last hour, then
        day) or `recent` (last seen) first."""
        ordered = sorted_summaries(ctx.board.summaries(), sort)
        return ClusterList(sort=sort, total=len(ordered), offset=offset, limit=limit,
                           clusters=[ClusterItem.of(c) for c in ordered[offset:offset + limit]])

    @v1.get("/clusters/{cluster_id}", tags=["clusters"], responses=error_responses(404, *V1_ERRORS))
    def cluster(request: Request, cluster_id: ClusterId, limit: PageSize = 100, offset: Offset = 0) -> ClusterDetail:
        """A cluster: its summary and history, a page of its members, and their posts in time order."""
        summary = ctx.board.summary(cluster_id)
        if summary is None:
            raise ApiError(404, "unknown_cluster", f"no cluster {cluster_id} (of 2 or more images); list them "
                                                   "with GET /v1/clusters")
        members = ctx.board.members([cluster_id])[cluster_id]
        page = members[offset:offset + limit]
        rows = ctx.index.get(page)
        timeline = posts_of(ctx.occurrences, page)
        return ClusterDetail(
            **dict(ClusterItem.of(summary)), history=[HistoryEvent(**e) for e in summary.history],
            members_total=len(members), timeline=timeline[:MAX_TIMELINE], timeline_total=len(timeline),
            members=[stored_image(rows[i], cluster_id, thumbnail_url(request, i)) for i in page if i in rows])

    @v1.get("/clusters/{cluster_id}/tree", tags=["clusters"], responses=error_responses(404, *V1_ERRORS))
    def cluster_tree(request: Request, cluster_id: ClusterId) -> ClusterTree:
        """A cluster's derivation tree: which image was made from which, by what edit, how surely,
        with each image's first observed post (docs/propagation.md)."""
        tree = ctx.trees.get(cluster_id)
        if not tree:
            raise ApiError(404, "unknown_tree", f"no derivation tree for cluster {cluster_id}: list clusters with "
                                                "GET /v1/clusters (trees are built when a run reclusters)")
        rows = ctx.index.get([d.image_id for d in tree])
        return tree_of(cluster_id, tree, rows, ctx.occurrences, lambda i: thumbnail_url(request, i))

    app.include_router(v1)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("gallery")

    # response_class=Response, not HTMLResponse: FastAPI would then describe the JSON errors as text/html
    @app.get("/gallery", response_class=Response, tags=["gallery"], responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "the page"},
        **error_responses(401, 422, 503)})
    def gallery(request: Request, creds: BearerCredentials, sort: Sort = "size",
                limit: Annotated[int, Query(ge=1, le=500)] = 50, token: str | None = None) -> Response:
        """The clusters as an HTML page; `?token=` stores the API token in a cookie for the browser."""
        if token is not None and auth.enabled:
            if not auth.matches(token):
                raise ApiError(401, "unauthorized", "the token does not match MEMETRACE_API_TOKEN",
                               {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            url = request.url.remove_query_params("token")  # keep the token out of history and logs
            redirect = RedirectResponse(f"gallery?{url.query}" if url.query else "gallery", status_code=303)
            redirect.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=url.scheme == "https")
            return redirect
        auth.require(request, creds)
        require_ready()
        return HTMLResponse(gallery_page(ctx.board, ctx.index, ctx.occurrences, sort, limit, needs_token=auth.enabled,
                                         hooks=[explain_links, tree_section(ctx.trees, ctx.occurrences, tree_thumb)]),
                            headers={"Content-Security-Policy": GALLERY_CSP})

    def tree_thumb(image_id: int) -> str:
        return f"v1/images/{image_id}/thumbnail"  # relative: the page is served at /gallery

    @app.get("/gallery.js", include_in_schema=False)
    def gallery_script() -> Response:
        return Response(script(), media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", tags=["operations"], responses=error_responses())
    async def healthz() -> Health:
        """200 while the process serves (liveness). On the event loop: no thread pool to wait for."""
        return Health()

    def ping_milvus() -> None:
        ctx.index.ping(MILVUS_PING_S)

    @app.get("/readyz", tags=["operations"], responses=error_responses(503))
    async def readyz() -> Ready:
        """200 when the model is loaded and Milvus answers (readiness), else 503 saying what is missing."""
        if problem := warmup.problem():
            raise ApiError(503, "not_ready", problem)
        try:
            await anyio.to_thread.run_sync(ping_milvus, limiter=probes)
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, Milvus is not answering
            raise ApiError(503, "not_ready", f"Milvus at {s.resolved_milvus_uri()} does not answer ({exc}); "
                                             "check that it is up and MEMETRACE_MILVUS_URI points to it") from None
        return Ready()

    @app.get("/metrics", tags=["operations"], response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition format"}, **error_responses()})
    def prometheus() -> Response:
        """Prometheus metrics of this process (the API's own registry)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
