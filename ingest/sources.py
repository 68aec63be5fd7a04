"""Where batch inputs come from: folders (recursive), image files, and text files of paths and URLs.

:func:`open_sources` turns what the user named on the command line into :class:`Source`\\ s, one
per path, deciding by what the path is: a folder, an image (by extension, else by its first
bytes), or a list of paths/URLs (by extension, else UTF-8 text); anything else is refused with
:class:`UnsupportedInput` before any work. Each source has a ``root``: the folder its files are
shown relative to (the folder itself, an image's folder, a list file's folder).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memetrace.imageio import _looks_like_image as looks_like_image  # the decoder's own sniff

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list", ".urls"})
ACCEPTED = "a folder, an image file or a text file of paths/URLs (one per line)"


class UnsupportedInput(ValueError):
    """A path that is none of what ``index`` accepts; the message is one line naming it."""


@dataclass(frozen=True)
class InputItem:
    """One thing to index: ``key`` is what users see (relative path or URL), ``read`` gets bytes.
    A local file also carries its size and mtime as listed (-1: not a local file)."""

    key: str
    read: Callable[[], bytes]
    size: int = -1
    mtime_ns: int = -1


@dataclass(frozen=True)
class Walk:
    """How folders are listed: ``exclude`` globs match a file's path relative to its folder or its
    name (a folder matching one is skipped whole); ``follow_links`` enters symlinked folders."""

    exclude: Sequence[str] = ()
    follow_links: bool = False

    def excluded(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(name, g) for g in self.exclude)


@dataclass(frozen=True)
class Source:
    """One path named by the user: its kind, the root its files are shown relative to, its items."""

    path: Path
    kind: str  # folder | image | list
    root: Path
    items: Callable[[], Iterator[InputItem]] = field(repr=False)

    @property
    def walks_folder(self) -> bool:
        """Whether every indexed file below ``root`` should still be in :attr:`items` (the missing ones were deleted)."""
        return self.kind == "folder"


def _file_reader(path: Path, max_bytes: int) -> Callable[[], bytes]:
    def read() -> bytes:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{size} bytes exceeds MEMETRACE_MAX_FILE_BYTES={max_bytes}")
        return path.read_bytes()

    return read


def file_item(path: Path, max_bytes: int) -> InputItem:
    """A local file keyed by its absolute path (two folders in one data dir never collide)."""
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:  # listed but gone, or a dangling entry of a list file: the read reports it
        size, mtime = -1, -1
    return InputItem(path.as_posix(), _file_reader(path, max_bytes), size, mtime)


def iter_directory(root: Path, max_bytes: int, walk: Walk = Walk()) -> Iterator[InputItem]:
    """Every regular file below ``root`` (hidden ones and excluded ones skipped), sorted."""
    root = root.resolve()
    seen = {os.path.realpath(root)}  # symlinked folders met twice (a loop) are entered once
    for folder, dirs, files in os.walk(root, followlinks=walk.follow_links):
        base = Path(folder)
        rel = base.relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(base / d)
            if d.startswith(".") or walk.excluded(prefix + d) or real in seen:
                continue
            seen.add(real)
            kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            path = base / name
            if name.startswith(".") or walk.excluded(prefix + name) or not path.is_file():
                continue
            yield file_item(path, max_bytes)


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
            yield file_item(Path(entry) if Path(entry).is_absolute() else base / entry, max_bytes)


def kind_of(path: Path) -> str:
    """folder, image or list; raises UnsupportedInput naming the path and what is accepted."""
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise UnsupportedInput(f"{path}: no such file or folder; expected {ACCEPTED}")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in LIST_SUFFIXES:
        return "list"
    with path.open("rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if looks_like_image(head):
        return "image"
    if b"\0" in head or not _utf8(head):
        raise UnsupportedInput(f"{path}: neither an image nor UTF-8 text; expected {ACCEPTED}")
    return "list"


_SNIFF_BYTES = 4096


def _utf8(head: bytes) -> bool:
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as exc:  # a character cut by the sniffed length is still text
        return len(head) == _SNIFF_BYTES and exc.start >= len(head) - 3


def open_sources(paths: Sequence[Path], max_bytes: int, fetch_url: Callable[[str], bytes],
                 walk: Walk = Walk()) -> list[Source]:
    """One Source per path, every path checked before any is read (one bad path: nothing done)."""
    out = []
    for given in paths:
        path = Path(given).expanduser()
        kind = kind_of(path)
        path = path.resolve()
        if kind == "folder":
            out.append(Source(path, kind, path, lambda p=path: iter_directory(p, max_bytes, walk)))
        elif kind == "image":
            out.append(Source(path, kind, path.parent, lambda p=path: iter((file_item(p, max_bytes),))))
        else:
            out.append(Source(path, kind, path.parent, lambda p=path: iter_list_file(p, max_bytes, fetch_url)))
    return out
