"""Every error the API answers is JSON ``{"error": code, "detail": what is wrong and how to fix it}``."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymilvus.exceptions import MilvusException
from starlette.exceptions import HTTPException

from memetrace.settings import Settings


class ApiError(Exception):
    """Raised by handlers; ``extra`` adds fields next to error and detail (e.g. a download's reason)."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers, self.extra = status, error, detail, headers, extra


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status, headers=headers)


def describe_validation(errors: list[dict[str, Any]]) -> str:
    """Pydantic errors as one line: ``query.sort: Input should be 'size', 'growth' or 'recent'``."""
    return "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors)


def install_error_handlers(app: FastAPI, settings: Settings) -> None:
    """JSON errors for ours, FastAPI's validation, Starlette's 404/405 and an unreachable Milvus.
    (Anything else is a bug: :class:`api.middleware.ObserveRequests` logs it and answers 500.)"""

    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail, exc.headers, **exc.extra)

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

    async def milvus_down(_: Request, exc: MilvusException) -> JSONResponse:
        return error_response(503, "milvus_unavailable",
                              f"Milvus at {settings.resolved_milvus_uri()} failed: {exc.message}; check that it "
                              "is up and MEMETRACE_MILVUS_URI points to it (/readyz says when it answers)")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(MilvusException, milvus_down)
