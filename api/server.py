"""``memetrace serve``: the query API under uvicorn, stopped gracefully by SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import socket

import uvicorn
from fastapi import FastAPI

from memetrace.api.app import create_app
from memetrace.api.auth import TokenCheck
from memetrace.components import Components

log = logging.getLogger(__name__)

# in-flight searches get this long to finish after SIGTERM: under Kubernetes' default 30 s grace period
GRACEFUL_SHUTDOWN_S = 20


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(f"cannot serve the API on {host}:{port} ({exc}); pass --port/--host or set "
                      "MEMETRACE_API_PORT / MEMETRACE_API_HOST") from exc


def server_for(app: FastAPI) -> uvicorn.Server:
    """uvicorn with our logging left alone (JSON lines; requests logged at info by the app itself)."""
    return uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, server_header=False,
                                         timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on"))


def serve(components: Components, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; host and port default to MEMETRACE_API_HOST / MEMETRACE_API_PORT."""
    settings = components.settings
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    sock = bind(host, port)
    log.info("query API listening", extra={"host": host, "port": sock.getsockname()[1],
                                           "auth": TokenCheck(settings.api_token).enabled})
    server_for(create_app(components)).run(sockets=[sock])
