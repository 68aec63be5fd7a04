"""String fields as the stores keep them: Milvus counts a VARCHAR's ``max_length`` in UTF-8 bytes
(a server refuses a longer value, error 1100; pymilvus issue 1812), so every backend cuts each
string field to its bytes the same way before storing it (the memory backends too: tests see what
Milvus keeps). A mapping kept as JSON text (a post's meta) is fitted entry by entry."""

from __future__ import annotations

import dataclasses
import json
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


def json_text(value: object) -> str:
    """The JSON text a store keeps of a mapping (compact, non-ASCII as is: Milvus counts bytes)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def fitted_mapping(m: Mapping[str, str], max_items: int, key_bytes: int, value_bytes: int,
                   max_bytes: int) -> dict[str, str]:
    """``m`` as the stores keep it: each key and value cut to its bytes (a key cut into one kept
    already is left out), then the first ``max_items`` entries whose :func:`json_text` fits in
    ``max_bytes``: cutting the JSON text instead would leave it unreadable."""
    out: dict[str, str] = {}
    size = 2  # "{}"
    for key, value in m.items():
        k, v = cut_utf8(key, key_bytes), cut_utf8(value, value_bytes)
        if not k or k in out:
            continue
        entry = len(json_text({k: v}).encode("utf-8")) - 2 + bool(out)  # '"k":"v"', and a comma after the first
        if len(out) == max_items or size + entry > max_bytes:
            break
        out[k] = v
        size += entry
    return out
