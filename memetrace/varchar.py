"""String fields as the stores keep them: Milvus counts a VARCHAR's ``max_length`` in UTF-8 bytes
(a server refuses a longer value, error 1100; pymilvus issue 1812), so every backend cuts each
string field to its bytes the same way before storing it (the memory backends too: tests see what
Milvus keeps)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

R = TypeVar("R")


def cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` of at most ``max_bytes`` UTF-8 bytes, never half a character
    (a lone surrogate, which UTF-8 cannot hold, becomes ``?``)."""
    # the cut can only split the last character: "ignore" drops its leading bytes, nothing else
    return text.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore")


def fitted(row: R, limits: Mapping[str, int]) -> R:
    """The dataclass ``row`` with each string field named in ``limits`` cut to its bytes."""
    changes: dict[str, Any] = {f: cut_utf8(getattr(row, f), n) for f, n in limits.items()}
    return dataclasses.replace(row, **changes)  # type: ignore[type-var]
