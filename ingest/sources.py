"""Where batch inputs come from: a folder (recursive) or a text file of paths and URLs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InputItem:
    """One thing to index: ``key`` is what users see (relative path or URL), ``read`` gets bytes."""

    key: str
    read: Callable[[], bytes]


def _file_reader(path: Path, max_bytes: int) -> Callable[[], bytes]:
    def read() -> bytes:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{size} bytes exceeds MEMETRACE_MAX_FILE_BYTES={max_bytes}")
        return path.read_bytes()

    return read


def iter_directory(root: Path, max_bytes: int) -> Iterator[InputItem]:
    """Every regular file below ``root`` (hidden ones skipped), keyed by its absolute path, so
    that two folders indexed into one data dir never collide."""
    root = root.resolve()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        yield InputItem(path.as_posix(), _file_reader(path, max_bytes))


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def iter_list_file(list_file: Path, max_bytes: int, fetch_url: Callable[[str], bytes]) -> Iterator[InputItem]:
    """Lines of a text file: local paths (relative to the file's folder) or http(s) URLs; paths
    are keyed absolute, URLs as written."""
    base = list_file.parent.resolve()
    for line in list_file.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if is_url(entry):
            yield InputItem(entry, lambda url=entry: fetch_url(url))
        else:
            path = Path(entry) if Path(entry).is_absolute() else base / entry
            yield InputItem(path.as_posix(), _file_reader(path, max_bytes))
