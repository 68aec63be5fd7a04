"""Per-request metrics and access log by route template, and the JSON 500 for unexpected errors."""

from __future__ import annotations

import logging
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memetrace.api.errors import error_response
from memetrace.api.metrics import ApiMetrics

log = logging.getLogger(__name__)

# label values must stay bounded whatever clients send
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CLIENT_CLOSED = 499  # nginx's code for a request the client abandoned: no answer went out, nothing broke


def _route_template(scope: Scope) -> str:
    """The matched route's template, not the raw path. FastAPI's routes put themselves in the scope;
    its docs routes (/docs, /openapi.json: plain Starlette routes) leave only their endpoint."""
    route, endpoint = scope.get("route"), scope.get("endpoint")
    if route is None and endpoint is not None:
        route = next((r for r in scope["app"].routes if getattr(r, "endpoint", None) is endpoint), None)
    return getattr(route, "path", "unmatched")


class ObserveRequests:
    """Pure ASGI (no buffering of bodies); sits inside Starlette's ServerErrorMiddleware."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, responded = 500, False

        async def send_observed(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except ClientDisconnect:  # gone while we read its body (an aborted upload)
            status = _CLIENT_CLOSED
        except Exception:
            log.error("unhandled error", exc_info=True, extra={"method": scope["method"], "path": scope["path"]})
            if responded:
                raise  # half a response is out: the server can only drop the connection
            await error_response(500, "internal_error", "unexpected server error (logged with its traceback); "
                                 "retry, and report it if it persists")(scope, receive, send_observed)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = _route_template(scope)
        method = scope["method"] if scope["method"] in _METHODS else "other"
        self.metrics.requests.labels(route, method, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(seconds)
        log.info("request", extra={"method": method, "route": route, "path": scope["path"], "status": status,
                                   "seconds": round(seconds, 4)})
