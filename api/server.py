"""``memetrace serve``: the query API under uvicorn, stopped gracefully by SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from functools import partial
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from memetrace.api.app import create_app
from memetrace.api.auth import TokenCheck
from memetrace.api.limits import ApiLimits
from memetrace.components import Components
from memetrace.errors import ConfigError

log = logging.getLogger(__name__)

# in-flight searches get this long to finish after SIGTERM: under Kubernetes' default 30 s grace period
GRACEFUL_SHUTDOWN_S = 20
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (h11's default, stated)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails at once (ConfigError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"cannot serve the API on {host}:{port}: {exc.strerror or exc}; use --port (or "
                          "MEMETRACE_API_PORT), or --host (MEMETRACE_API_HOST)") from exc


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's head (MEMETRACE_API_HEADER_TIMEOUT_S):
    uvicorn itself times a connection out only while it is idle, so a client that sends half a header
    line would hold its socket for ever. The body has its deadline in the app (:class:`memetrace.api.limits.BodyDeadline`)."""

    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        self._arm_head_deadline()  # before: a pipelined request started by super() must not be timed
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        waiting_after = self.cycle  # the request before the one whose head is awaited (None: the first)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_overdue, waiting_after)

    def _head_overdue(self, waiting_after: object) -> None:
        if self.cycle is waiting_after and not self.transport.is_closing():
            self.transport.close()  # no complete head yet: nothing to answer


def server_for(app: FastAPI) -> uvicorn.Server:
    """uvicorn with our logging left alone (JSON lines; requests logged at info by the app itself), a
    deadline on request heads, and the app's connection limit: beyond it uvicorn answers 503 before
    reading a request."""
    limits: ApiLimits = app.state.limits
    protocol = partial(HeadDeadline, head_timeout_s=limits.header_timeout_s)
    return uvicorn.Server(uvicorn.Config(app, http=protocol,  # type: ignore[arg-type] # a protocol factory
                                         log_config=None, access_log=False, server_header=False,
                                         timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on",
                                         limit_concurrency=limits.max_connections, timeout_keep_alive=KEEP_ALIVE_S,
                                         h11_max_incomplete_event_size=MAX_HEAD_BYTES))


def serve(components: Components, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; host and port default to MEMETRACE_API_HOST / MEMETRACE_API_PORT."""
    settings = components.settings
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    sock = bind(host, port)
    log.info("query API listening", extra={"host": host, "port": sock.getsockname()[1],
                                           "auth": TokenCheck(settings.api_token).enabled})
    run(server_for(create_app(components)), sock)


def run(server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve on ``sock`` until SIGTERM/SIGINT. uvicorn stops gracefully, then raises the signal again
    under the handler it found: for SIGTERM one that exits (status 143) instead of dying by the signal,
    so the atexit hooks run (a Milvus Lite this process hosts is closed and its record removed)."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    server.run(sockets=[sock])
