"""``POST /v1/search``: take the query image (an upload, or a URL downloaded through the SSRF-guarded
fetcher) within the size limit, find its copies, describe them from the stores."""

from __future__ import annotations

import time

import anyio.to_thread
from anyio import CapacityLimiter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message, Receive

from memetrace.api.errors import ApiError, describe_validation, features_missing, unknown_image
from memetrace.api.limits import Place
from memetrace.api.records import posts_of
from memetrace.api.schemas import POSTS_PER_MATCH, MatchGeometry, Post, QueryImage, SearchMatch, SearchResponse
from memetrace.fetch import Fetcher
from memetrace.matcher.query import Copy, CopyFinder
from memetrace.matcher.stored import FeaturesMissing, NotStored
from memetrace.imageio import BadImage
from memetrace.api.metrics import ApiMetrics
from memetrace.components import Components

FIELD = "image"
BODY_SLACK = 64 * 1024  # multipart boundaries and part headers around the image bytes
JSON_MAX_BYTES = 16 * 1024  # {"url": ...} with a URL of at most 4096 characters, and room to spare
FORMATS_HINT = "upload a JPEG, PNG, GIF, WebP, BMP or TIFF image"

OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [FIELD],
                                       "properties": {FIELD: {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": {"type": "object", "required": ["url"], "additionalProperties": False,
                                    "properties": {"url": {"type": "string", "format": "uri"}}}},
}}}


class SearchByUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=4096)


class _TooLarge(Exception):
    pass


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "too_large", f"the image exceeds MEMETRACE_API_MAX_UPLOAD_BYTES={max_bytes} bytes; "
                                      "send a smaller file (thumbnails search as well as originals)")


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that stops the request once more than ``limit`` body bytes arrived."""
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _TooLarge
        return message

    return receive_limited


async def read_query_image(request: Request, max_bytes: int, fetcher: Fetcher, downloads: CapacityLimiter,
                           place: Place) -> bytes:
    """The query image's bytes, from the multipart field ``image`` or a JSON ``{"url": ...}``.

    An upload takes its ``place`` in the search pool before a byte of it is read: the pool's room
    bounds the uploads held at once. A download can wait on a slow server for minutes: it takes a
    thread of ``downloads``, never one of the shared pool that every other endpoint (and its auth
    check) needs, nor a search place."""
    limit = max_bytes + BODY_SLACK
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(max_bytes)  # refused before a byte of the body is read
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = Request(request.scope, _limited(request.receive, limit))
    try:
        if media_type == "multipart/form-data":
            try:
                place.take()
            except ApiError:
                await _discard_body(request, max_bytes)  # unparsed, unheld: so the client reads the 503
                raise
            return await _uploaded(body, max_bytes)
        if media_type == "application/json" or media_type.endswith("+json"):
            query = _parse_url_query(await _json_body(request))
            place.pool.check()  # no download for a search that would be refused
            return await anyio.to_thread.run_sync(_download, fetcher, query.url, limiter=downloads)
    except _TooLarge:
        raise _too_large(max_bytes) from None
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {media_type or '(none)'} is not accepted: send multipart/form-data with the "
                   f'file in field "{FIELD}" (curl -F {FIELD}=@photo.jpg), or application/json {{"url": "..."}}')


async def _discard_body(request: Request, max_bytes: int) -> None:
    """Read the body to its end without parsing it: an early refusal still answers a client that is
    sending (closing under it would reset the connection, answer included)."""
    try:
        async for _ in Request(request.scope, _limited(request.receive, max_bytes + BODY_SLACK)).stream():
            pass
    except _TooLarge:
        raise _too_large(max_bytes) from None


async def _json_body(request: Request) -> bytes:
    """The JSON body, held to JSON_MAX_BYTES: a URL query has no reason to be megabytes long."""
    try:
        return await Request(request.scope, _limited(request.receive, JSON_MAX_BYTES)).body()
    except _TooLarge:
        raise ApiError(413, "too_large", f"a JSON search body is at most {JSON_MAX_BYTES} bytes: send "
                                         '{"url": "https://..."} and nothing else') from None


async def _uploaded(body: Request, max_bytes: int) -> bytes:
    form = await body.form(max_files=1, max_fields=8)
    try:
        upload = form.get(FIELD)
        if upload is None:
            raise ApiError(422, "missing_image", f'no multipart field "{FIELD}": send the file as '
                                                 f"-F {FIELD}=@photo.jpg")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_image", f'the multipart field "{FIELD}" is text, not a file: '
                                                 f"send it as -F {FIELD}=@photo.jpg")
        data = await upload.read(max_bytes + 1)
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    if not data:
        raise ApiError(400, "empty", f'the uploaded file "{upload.filename}" is empty (0 bytes); {FORMATS_HINT}')
    return data


def _parse_url_query(body: bytes) -> SearchByUrl:
    try:
        return SearchByUrl.model_validate_json(body)
    except ValidationError as exc:
        errors = list(exc.errors())
        if any(e["type"] == "json_invalid" for e in errors):
            raise ApiError(400, "invalid_json", 'the body is not valid JSON: send {"url": "https://..."}') from None
        raise ApiError(422, "invalid_request", f'{describe_validation(errors)}: send {{"url": "https://..."}} '
                                               "and nothing else") from None


def _download(fetcher: Fetcher, url: str) -> bytes:
    res = fetcher.fetch(url)
    if res.ok and res.data is not None:
        return res.data
    status = 413 if res.reason == "too_large" else 422
    raise ApiError(status, "download_failed",
                   f"could not use {url!r}: {res.reason} ({res.detail}); give a public http(s) URL of an image, "
                   f'or upload the file in the multipart field "{FIELD}"', reason=res.reason)


def search_image(finder: CopyFinder, ctx: Components, metrics: ApiMetrics, data: bytes) -> SearchResponse:
    """Find the copies of the image in ``data`` and describe them (blocking: run it in a thread)."""
    started = time.perf_counter()
    try:
        image, copies = finder.find(data)
    except BadImage as exc:
        raise ApiError(400 if exc.reason == "empty" else 422, exc.reason,
                       f"the image cannot be searched: {exc.detail or exc.reason}; {FORMATS_HINT}") from None
    query = QueryImage(image_id=image.image_id, width=image.width, height=image.height,
                       stored=bool(ctx.index.existing([image.image_id])))
    result = _describe(ctx, query, copies)
    metrics.search_seconds.labels(query="upload").observe(time.perf_counter() - started)
    return result


def search_stored(finder: CopyFinder, ctx: Components, metrics: ApiMetrics, image_id: int) -> SearchResponse:
    """The copies of stored image ``image_id``, from its stored features (blocking: run it in a thread)."""
    started = time.perf_counter()
    try:
        record, copies = finder.find_stored(image_id)
    except NotStored:
        raise unknown_image(image_id) from None
    except FeaturesMissing:
        raise features_missing(image_id) from None
    result = _describe(ctx, QueryImage(image_id=image_id, width=record.width, height=record.height, stored=True),
                       copies)
    metrics.search_seconds.labels(query="stored").observe(time.perf_counter() - started)
    return result


def _describe(ctx: Components, query: QueryImage, copies: list[Copy]) -> SearchResponse:
    ids = [c.image_id for c in copies]
    rows, clusters = ctx.index.get(ids), ctx.board.clusters_of(ids)
    posts_by_image: dict[int, list[Post]] = {}
    for post in posts_of(ctx.occurrences, ids):  # one query for every match
        posts_by_image.setdefault(post.image_id, []).append(post)
    matches = []
    for c in copies:
        posts = posts_by_image.get(c.image_id, [])
        matches.append(SearchMatch(image_id=c.image_id, inliers=c.inliers, kind=c.kind, similarity=c.similarity,
                                   mirrored=c.mirrored, cluster_id=clusters.get(c.image_id),
                                   geometry=MatchGeometry.of(c.geometry) if c.geometry else None,
                                   path=rows[c.image_id].path if c.image_id in rows else None,
                                   posts=posts[:POSTS_PER_MATCH], posts_total=len(posts)))
    return SearchResponse(query=query, matches=matches)
