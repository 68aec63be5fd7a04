"""Structured logs: one JSON object per line on stderr, quiet (warnings) unless asked."""

from __future__ import annotations

import json
import logging
import sys

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(verbosity: int = 0) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG)
    # Milvus Lite's embedded gRPC server logs a traceback for an RPC it does not implement
    # (AllocTimestamp) on every start; pymilvus falls back by itself, so it is noise
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    # pymilvus warns on every Milvus Lite query iterator that it uses a client-side timestamp
    if verbosity <= 0:
        logging.getLogger("pymilvus").setLevel(logging.ERROR)
