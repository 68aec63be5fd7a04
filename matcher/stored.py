"""A stored image named by its id: what a command-line argument names (a file, else an id), and why
a stored image cannot be used (:class:`NotStored`, :class:`FeaturesMissing`).

Shared by ``memetrace query`` / ``GET /v1/images/{id}/copies`` (:mod:`memetrace.matcher.query`) and
``memetrace explain`` / ``GET /v1/explain`` (:mod:`memetrace.matcher.explain`).
"""

from __future__ import annotations

from pathlib import Path

from memetrace.messages import MAX_ID


class NotStored(Exception):
    """An image id that the index does not hold (or an argument that is neither a file nor an id)."""


class FeaturesMissing(Exception):
    """An image the index holds whose keypoints the feature store does not: it cannot be verified."""


def file_or_id(arg: str) -> Path | int:
    """``arg`` as a readable file, else as an image id in [0, 2^63) (raises :class:`NotStored`)."""
    path = Path(arg)
    if path.is_file():
        return path
    if arg.isascii() and arg.isdigit() and int(arg) <= MAX_ID:
        return int(arg)
    raise NotStored(arg)


def not_stored_hint(arg: object, data_dir: Path) -> str:
    """The one-line error of an argument that names neither a file nor an indexed image."""
    return (f"{arg}: neither a readable file nor the id of an image indexed in {data_dir} "
            "(ids: `memetrace query FILE --json`)")


def features_missing_hint(image_id: object) -> str:
    """The one-line error of a stored image without keypoints, with its fix."""
    return (f"image {image_id} is stored but the feature store has no keypoints for it (removed, or another "
            "MEMETRACE_FEATURE_STORE): index its file again")
