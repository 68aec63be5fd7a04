"""memetrace: follow images as they are reused across social networks.

This package holds only what every stage shares: settings, the message contracts and domain
types, the store interfaces (vector index, occurrence log, cluster board, feature store) and their
backends, image decoding, the embedder, keypoints and the consume loop. The stages live in the
repository folders ``ingest/``, ``matcher/``, ``clusterer/`` and ``api/``, installed as
``memetrace.ingest`` ...; ``cli/`` (``memetrace.cli``) wires them together. docs/DESIGN.md is the map.

One entry point reaches up: :func:`open`, the Python API (docs/python-api.md), imports the
composition root only when called, so ``import memetrace`` stays light (tests/test_layering.py
allows exactly this).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memetrace.cli.library import Library

__version__ = "0.1.0"
#: the Python API's types, importable from here (``memetrace.Table``...), loaded on first use
_API_NAMES = ("Library", "QueryMatch", "QueryResult", "Table")


def open(data_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Library:  # noqa: A001
    """Open a data dir to index folders, query images, list clusters: a
    :class:`~memetrace.cli.library.Library`. ``data_dir`` None: the CLI's (``MEMETRACE_DATA_DIR`` or
    ``./memetrace-data``); ``overrides``: settings by field name (``min_inliers=20``), over the
    ``MEMETRACE_*`` environment. Use it as a context manager, or ``close()`` it."""
    from memetrace.cli.library import open_library

    return open_library(data_dir, **overrides)


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        import memetrace.cli.library

        return getattr(memetrace.cli.library, name)
    raise AttributeError(f"module 'memetrace' has no attribute {name!r}")
