"""Load the model and connect to Milvus off the event loop: ``/healthz`` answers at once, ``/readyz``
(and every endpoint that needs them) waits for this, so Kubernetes routes no search to a cold pod."""

from __future__ import annotations

import logging
import threading
import time

from memetrace.components import Components

log = logging.getLogger(__name__)

RETRY_S = 5.0


class Warmup:
    def __init__(self, ctx: Components, retry_s: float = RETRY_S) -> None:
        self.ctx = ctx
        self.retry_s = retry_s
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._error: str | None = None
        self._since = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="api-warmup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def problem(self) -> str | None:
        """None once ready, else what is missing (for /readyz and the 503 of early requests)."""
        if self.ready.is_set():
            return None
        if self._error:
            return f"warm-up failed, retrying every {self.retry_s:g} s: {self._error}"
        return f"loading the model and connecting to Milvus (for {time.monotonic() - self._since:.0f} s)"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c = self.ctx
                _ = c.embedder, c.extractor, c.index, c.occurrences, c.board, c.features  # built on first access
            except Exception as exc:  # noqa: BLE001 - Milvus may come up later; keep /healthz alive meanwhile
                self._error = f"{type(exc).__name__}: {exc}"
                log.error("API warm-up failed", exc_info=True,
                          extra={"retry_s": self.retry_s, "milvus_uri": self.ctx.settings.resolved_milvus_uri()})
                self._stop.wait(self.retry_s)
                continue
            self._error = None
            self.ready.set()
            log.info("API ready", extra={"seconds": round(time.monotonic() - self._since, 2)})
            return
