"""``/docs`` (Swagger UI) and ``/redoc`` served by the app itself, so they work offline.

FastAPI's own pages load their scripts from a CDN: without internet ``/docs`` is blank. The assets
come from the pinned ``fastapi-offline`` wheel (Swagger UI 5, ReDoc 2; only its files are used)
and are served under ``/docs/assets/``; every URL on the pages is relative to the app's root path.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from memetrace.api.errors import ApiError

ASSETS = files("fastapi_offline") / "static"
ASSET_TYPES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
ASSETS_PATH = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets to ``app`` (made with ``docs_url=redoc_url=None``)."""

    def assets(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{ASSETS_PATH}"

    def openapi_url(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    @app.get("/docs", include_in_schema=False)
    def swagger(request: Request) -> HTMLResponse:
        base = assets(request)
        return get_swagger_ui_html(openapi_url=openapi_url(request), title=f"{app.title} - API docs",
                                   swagger_js_url=f"{base}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{base}/swagger-ui.css", swagger_favicon_url=f"{base}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        base = assets(request)
        return get_redoc_html(openapi_url=openapi_url(request), title=f"{app.title} - API reference",
                              redoc_js_url=f"{base}/redoc.standalone.js", redoc_favicon_url=f"{base}/favicon.png",
                              with_google_fonts=False)

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        media = ASSET_TYPES.get(name)
        if media is None:
            raise ApiError(404, "not_found", f"no docs asset {name!r}; the docs are at /docs")
        # the files change only with the pinned package: let browsers keep them a day
        return Response((ASSETS / name).read_bytes(), media_type=media,
                        headers={"Cache-Control": "public, max-age=86400"})
