"""Per-image keypoints and thumbnails, addressed by image id.

``FeatureStore`` does the (de)serialisation once; a backend only moves bytes by key
(``LocalFeatureStore``: a directory, ``MemoryFeatureStore``: a dict for tests). An S3 backend
implements the same three methods.
"""

from __future__ import annotations

import io
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from memetrace.keypoints import Keypoints


class FeatureStore(ABC):
    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if there is one."""

    def remove_images(self, image_ids: Iterable[int]) -> None:
        """Delete the keypoints and thumbnail of these images."""
        for i in image_ids:
            self.delete(self.keypoints_key(i))
            self.delete(self.thumbnail_key(i))

    @staticmethod
    def keypoints_key(image_id: int) -> str:
        h = f"{image_id:016x}"
        return f"keypoints/{h[:2]}/{h}.npz"

    @staticmethod
    def thumbnail_key(image_id: int) -> str:
        h = f"{image_id:016x}"
        return f"thumbnails/{h[:2]}/{h}.jpg"

    def put_keypoints(self, image_id: int, kp: Keypoints) -> None:
        buf = io.BytesIO()
        np.savez(buf, xy=kp.xy.astype(np.float32), desc=kp.desc.astype(np.uint8),
                 size=np.array([kp.width, kp.height], np.int32))
        self.put_bytes(self.keypoints_key(image_id), buf.getvalue())

    def get_keypoints(self, image_id: int) -> Keypoints | None:
        data = self.get_bytes(self.keypoints_key(image_id))
        if data is None:
            return None
        with np.load(io.BytesIO(data)) as z:
            w, h = (int(v) for v in z["size"])
            return Keypoints(xy=z["xy"], desc=z["desc"], width=w, height=h)

    def put_thumbnail(self, image_id: int, jpeg: bytes) -> None:
        self.put_bytes(self.thumbnail_key(image_id), jpeg)

    def get_thumbnail(self, image_id: int) -> bytes | None:
        return self.get_bytes(self.thumbnail_key(image_id))


class LocalFeatureStore(FeatureStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a file

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


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
