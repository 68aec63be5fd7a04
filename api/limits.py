"""What keeps hostile uploads from taking the API down: searches on a pool of their own with a
bounded queue (503 busy beyond it), and a deadline on every request body (408 past it).

An upload holds its place in the pool from before its body is read until its answer: at most
threads + queue query images are being received, spooled or decoded at once, whatever the number
of connections.

``/healthz`` answers on the event loop and ``/readyz`` on a thread of its own: neither waits
behind a search, whatever is decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread
from anyio import CapacityLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memetrace.api.errors import ApiError
from memetrace.settings import Settings

T = TypeVar("T")
BUSY_RETRY_AFTER_S = 2


@dataclass(frozen=True)
class ApiLimits:
    search_threads: int  # searches running at once
    search_queue: int  # searches waiting for a thread; beyond, 503
    body_timeout_s: float  # the whole request body must arrive within this
    header_timeout_s: float  # the request line and headers must arrive within this
    max_connections: int  # uvicorn's limit_concurrency

    @classmethod
    def from_settings(cls, s: Settings) -> ApiLimits:
        return cls(s.api_search_concurrency, s.api_search_queue, s.api_body_timeout_s, s.api_header_timeout_s,
                   s.api_max_connections)


class SearchPool:
    """Runs searches on ``threads`` threads of their own; at most ``queue`` more hold a place
    (receiving their upload, or waiting for a thread), beyond that one is refused at once.

    Used from the event loop only (one thread), so the counts need no lock."""

    def __init__(self, threads: int, queue: int) -> None:
        self._limiter = CapacityLimiter(threads)
        self.room = threads + queue
        self.held = 0  # places taken now: uploads being read, searches waiting or running
        self.refused = 0  # searches answered busy, since the start

    def check(self) -> None:
        """Raise 503 busy when no place is left."""
        if self.held >= self.room:
            self.refused += 1
            raise ApiError(503, "busy", f"{self.held} searches are running or waiting (MEMETRACE_API_SEARCH_"
                                        f"CONCURRENCY + MEMETRACE_API_SEARCH_QUEUE); retry in {BUSY_RETRY_AFTER_S} s",
                           {"Retry-After": str(BUSY_RETRY_AFTER_S)})

    def place(self) -> Place:
        return Place(self)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on one of the pool's threads, once one is free: call it holding a :class:`Place`."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


class Place:
    """One search's place in a :class:`SearchPool`: taken by :meth:`take` (503 busy when none is
    left; again: a no-op), given back when the ``with`` block ends, however it ends."""

    def __init__(self, pool: SearchPool) -> None:
        self.pool = pool
        self.taken = False

    def take(self) -> None:
        if not self.taken:
            self.pool.check()
            self.pool.held += 1
            self.taken = True

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *_: object) -> None:
        if self.taken:
            self.pool.held -= 1
            self.taken = False


class BodyDeadline:
    """Pure ASGI: a request whose body has not fully arrived ``timeout_s`` after its headers is
    answered 408 and its connection closed (a stalled upload holds no socket, buffer or task)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout_s
        body_done = False

        async def receive_by_deadline() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()  # after the body: only http.disconnect, whenever it comes
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as scope_:
                message = await receive()
            if scope_.cancelled_caught:
                raise ApiError(408, "body_timeout", f"the request body did not arrive within "
                                                    f"MEMETRACE_API_BODY_TIMEOUT_S={self.timeout_s:g} s; send it "
                                                    "at once (or a smaller image)", {"Connection": "close"})
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_by_deadline, send)
