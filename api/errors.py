"""Every error the API answers is JSON ``{"error": code, "detail": what is wrong and how to fix it}``
(:class:`~memetrace.api.schemas.ErrorBody`), declared for every route in the OpenAPI document."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from memetrace.api.schemas import ErrorBody
from memetrace.errors import DependencyDown
from memetrace.matcher.stored import features_missing_hint
from memetrace.settings import Settings

MAX_DETAIL = 4096  # ErrorBody.detail: a dependency's message could be longer

# the error responses of the OpenAPI document; each route declares those it can answer
_MEANINGS = {400: "unreadable request (bad JSON, empty file)", 401: "missing or wrong token",
             404: "unknown id", 408: "the body did not arrive in time", 413: "body too large",
             409: "the image is stored but its keypoints are not", 415: "unsupported Content-Type",
             422: "invalid parameters, not an image, or a failed download",
             500: "unexpected server error (logged)", 503: "not ready yet, busy, or Milvus down: see Retry-After"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route answering these errors (and 500, which any route can)."""
    return {status: {"model": ErrorBody, "description": _MEANINGS[status]} for status in sorted({*statuses, 500})}


class ApiError(Exception):
    """Raised by handlers; ``reason`` is a failed download's (next to error and detail)."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers, self.reason = status, error, detail, headers, reason


def unknown_image(image_id: object) -> ApiError:
    """404 for an image id no stored image has."""
    return ApiError(404, "unknown_image", f"no stored image has id {image_id}; ids come from POST /v1/search "
                                          "or GET /v1/clusters/{id}")


def features_missing(image_id: object) -> ApiError:
    """409 for a stored image whose keypoints the feature store lacks."""
    return ApiError(409, "features_missing", features_missing_hint(image_id))


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None,
                   reason: str | None = None) -> JSONResponse:
    body = ErrorBody(error=error, detail=detail[:MAX_DETAIL], reason=reason)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def describe_validation(errors: list[dict[str, Any]]) -> str:
    """Pydantic errors as one line: ``query.sort: Input should be 'size', 'growth' or 'recent'``."""
    return "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors)


def install_error_handlers(app: FastAPI, settings: Settings) -> None:
    """JSON errors for ours, FastAPI's validation, Starlette's 404/405 and an unreachable Milvus.
    (Anything else is a bug: :class:`api.middleware.ObserveRequests` logs it and answers 500.)"""

    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail, exc.headers, exc.reason)

    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", f"{describe_validation(list(exc.errors()))} (see /docs)")

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:  # our own 404s are ApiErrors: this is "no such route"
            detail = f"no endpoint {request.method} {request.url.path}; the endpoints are listed at /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {exc.headers.get('Allow')}"
        else:
            detail = str(exc.detail)
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return error_response(exc.status_code, code, detail, exc.headers)

    async def dependency_down(_: Request, exc: DependencyDown) -> JSONResponse:
        if exc.dependency != "milvus":
            return error_response(503, f"{exc.dependency}_unavailable", f"{exc}; /readyz says when it answers")
        return error_response(503, "milvus_unavailable",
                              f"Milvus at {settings.resolved_milvus_uri()} failed: {exc.detail}; check that it "
                              "is up and MEMETRACE_MILVUS_URI points to it (/readyz says when it answers)")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(DependencyDown, dependency_down)
