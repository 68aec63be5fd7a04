"""Per-image keypoints and thumbnails, addressed by image id.

``FeatureStore`` does the (de)serialisation once (keypoints: :mod:`memetrace.kpcodec`); a backend
only moves bytes by key (``LocalFeatureStore``: packed SQLite files, ``MemoryFeatureStore``: a
dict for tests). An S3 backend implements the same four methods.

The local store packs its objects into one SQLite file per kind (``keypoints.db``,
``thumbnails.db``) with 1 KiB pages: one file per image wasted half a 4 KiB block on average,
as much as a whole coded keypoint set. A data dir of the one-file-per-image layout is refused
with one line (:class:`~memetrace.sqlite_file.IncompatibleFile`).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from memetrace.keypoints import Keypoints
from memetrace.kpcodec import KeypointCodec
from memetrace.sqlite_file import FileFormat, IncompatibleFile, SqliteFile


class FeatureStore(ABC):
    """``codec``: how keypoints become bytes; the composition root sets the configured one
    (:meth:`memetrace.kpcodec.KeypointCodec.from_settings`), any codec reads every coding."""

    codec: KeypointCodec = KeypointCodec()

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if there is one."""

    def close(self) -> None:
        """Release what the backend holds open (a later call opens it again); default: nothing."""

    def remove_images(self, image_ids: Iterable[int]) -> None:
        """Delete the keypoints and thumbnail of these images."""
        for i in image_ids:
            self.delete(self.keypoints_key(i))
            self.delete(self.thumbnail_key(i))

    @staticmethod
    def keypoints_key(image_id: int) -> str:
        h = f"{image_id:016x}"
        return f"keypoints/{h[:2]}/{h}.kpc"

    @staticmethod
    def thumbnail_key(image_id: int) -> str:
        h = f"{image_id:016x}"
        return f"thumbnails/{h[:2]}/{h}.jpg"

    def put_keypoints(self, image_id: int, kp: Keypoints) -> None:
        self.put_bytes(self.keypoints_key(image_id), self.codec.encode(kp))

    def get_keypoints(self, image_id: int) -> Keypoints | None:
        data = self.get_bytes(self.keypoints_key(image_id))
        return None if data is None else self.codec.decode(data, self.keypoints_key(image_id))

    def put_thumbnail(self, image_id: int, jpeg: bytes) -> None:
        self.put_bytes(self.thumbnail_key(image_id), jpeg)

    def get_thumbnail(self, image_id: int) -> bytes | None:
        return self.get_bytes(self.thumbnail_key(image_id))

    def put_many(self, objects: Sequence[tuple[str, bytes]]) -> None:
        """Several objects (key, bytes); a backend may write them together (default: one by one)."""
        for key, data in objects:
            self.put_bytes(key, data)

    def put_images(self, images: Sequence[tuple[int, Keypoints, bytes]]) -> None:
        """Keypoints and thumbnail (JPEG) of several images, in as few writes as the backend allows."""
        self.put_many([(self.keypoints_key(i), self.codec.encode(kp)) for i, kp, _ in images]
                      + [(self.thumbnail_key(i), jpeg) for i, _, jpeg in images])


PACKED = FileFormat(
    application_id=0x4D544650,  # "MTFP": memetrace feature pack
    version=1,
    what="packed feature store",
    fix="run `memetrace reset`, then `memetrace index` again (or index into a new data dir)",
    # small pages: an object wastes half a page on average, and most are a few KiB
    schema="PRAGMA page_size = 1024; CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, data BLOB NOT NULL)")


WAL_PAGES = 128


class LocalFeatureStore(FeatureStore):
    """Objects of ``root``: the first part of a key names the SQLite file (``keypoints/..`` ->
    ``root/keypoints.db``), the rest is its key there."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._files: dict[str, SqliteFile] = {}
        self._lock = threading.Lock()  # one SqliteFile per kind, whichever thread asks first
        old = self.root / "keypoints"
        if old.is_dir():
            raise IncompatibleFile(f"{old} holds keypoints of an older format (one file per image); "
                                   f"{PACKED.fix}")

    @staticmethod
    def file_name(kind: str) -> str:
        return f"{kind}.db"

    def _file(self, key: str) -> tuple[SqliteFile, str]:
        kind, _, rest = key.partition("/")
        with self._lock:
            if kind not in self._files:
                f = SqliteFile(self.root / self.file_name(kind), PACKED)
                # a small write-ahead log, cut back after each checkpoint: at rest it stays ~128 KiB;
                # commits wait for the disk only at checkpoints: a crashed process loses nothing, a
                # power cut may lose the last commits (SQLite's usual WAL trade, ~7 ms per commit saved)
                f.db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
                f.db.execute(f"PRAGMA journal_size_limit = {WAL_PAGES * 1024}")
                f.db.execute("PRAGMA synchronous = NORMAL")
                self._files[kind] = f
            return self._files[kind], rest

    def put_bytes(self, key: str, data: bytes) -> None:
        self.put_many([(key, data)])

    def put_many(self, objects: Sequence[tuple[str, bytes]]) -> None:
        """One transaction per file: each commit waits for the disk (~7 ms here), per object it
        cost the streaming ingest a third of its time."""
        rows: dict[SqliteFile, list[tuple[str, bytes]]] = {}
        for key, data in objects:
            f, k = self._file(key)
            rows.setdefault(f, []).append((k, bytes(data)))
        for f, batch in rows.items():
            f.write("INSERT OR REPLACE INTO objects (key, data) VALUES (?, ?)", batch)

    def get_bytes(self, key: str) -> bytes | None:
        f, k = self._file(key)
        rows = f.read("SELECT data FROM objects WHERE key = ?", (k,))
        return bytes(rows[0][0]) if rows else None

    def exists(self, key: str) -> bool:
        f, k = self._file(key)
        return bool(f.read("SELECT 1 FROM objects WHERE key = ?", (k,)))

    def delete(self, key: str) -> None:
        f, k = self._file(key)
        f.write("DELETE FROM objects WHERE key = ?", [(k,)])

    def count(self, kind: str) -> int:
        """Objects of one kind (``keypoints``: images with keypoints), without creating its file."""
        if kind not in self._files and not (self.root / self.file_name(kind)).is_file():
            return 0
        return int(self._file(f"{kind}/")[0].read("SELECT COUNT(*) FROM objects")[0][0])

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


class MemoryFeatureStore(FeatureStore):
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.blobs[key] = bytes(data)

    def get_bytes(self, key: str) -> bytes | None:
        return self.blobs.get(key)

    def exists(self, key: str) -> bool:
        return key in self.blobs

    def delete(self, key: str) -> None:
        self.blobs.pop(key, None)
