"""Turn untrusted bytes into an RGB image, or a reason why not.

Every image that enters memetrace goes through :func:`decode`: it hashes the bytes (the image id),
refuses what is empty, not an image, truncated, too small, a decompression bomb or a progressive
JPEG with too many scans, and normalises every mode (CMYK, alpha, 16-bit, palette, grayscale,
first frame of animations) to 8-bit RGB.

Images are kept at the working size of the pipeline (``DecodeLimits.max_side``), never at full
resolution: JPEGs are decoded scaled down by libjpeg (draft mode), other formats are shrunk right
after decompression, while a :class:`memetrace.decode_budget.DecodeBudget` bounds the pixels being
decompressed at once. The original width and height are kept for what is stored.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import cv2
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from memetrace.decode_budget import DecodeBudget

if TYPE_CHECKING:
    from memetrace.settings import Settings


class BadImage(Exception):
    """An input that cannot be indexed; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    image_id: int
    rgb: np.ndarray  # H x W x 3, uint8, longest side at most DecodeLimits.max_side
    nbytes: int
    width: int  # of the original image, upright (EXIF orientation applied)
    height: int


@dataclass(frozen=True)
class DecodeLimits:
    """What :func:`decode` accepts and the size it keeps images at."""

    max_pixels: int = 60_000_000
    min_side: int = 32
    max_side: int = 1280
    max_jpeg_scans: int = 100

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(max_pixels=s.max_pixels, min_side=s.min_side, max_side=s.decode_max_side,
                   max_jpeg_scans=s.max_jpeg_scans)


def content_id(data: bytes) -> int:
    """Positive int64 derived from the bytes: the same file always gets the same primary key."""
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


# Formats we decode; anything else (EPS would run Ghostscript, say) is not an image to us.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _png_damaged(data: bytes) -> bool:
    """True when a PNG chunk's CRC is wrong (PIL checks none of the pixel data's)."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        body = data[pos + 4:pos + 8 + length]
        if len(body) != 4 + length or data[pos + 8 + length:pos + 12 + length] != struct.pack(">I", zlib.crc32(body)):
            return True
        if body[:4] == b"IEND":
            return False
        pos += 12 + length
    return True  # no IEND: truncated


# Bytes after 0xFF that are not markers: 0x00 (stuffing), RST0-7 (inside entropy-coded data), 0xFF (fill).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0-7, SOI: no length field


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """Start-of-scan markers of the JPEG in ``data``, counted by walking its segments (no decoding).

    Stops at the end-of-image marker, at ``stop_after + 1`` scans, or where the data ends.
    """
    pos, scans = 2, 0
    while scans <= stop_after and pos + 4 <= len(data):
        if data[pos] != 0xFF or data[pos + 1] == 0xFF:  # fill bytes or junk: resynchronise
            found = _NEXT_MARKER.search(data, pos + 1)
            if found is None:
                break
            pos = found.start()
            continue
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # SOS: its entropy-coded data runs to the next marker
            scans += 1
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return scans


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _working_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    """``im`` with its longest side at most ``max_side``, by area averaging (what SIFT's own
    downscaling did); palette and bilevel images go to RGB first, PIL would resize them nearest."""
    size = _working_size(*im.size, max_side)
    if size == im.size:
        return im
    if im.mode in ("1", "P", "PA"):
        im = _to_rgb(im)
    return im.resize(size, Image.Resampling.BOX)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L"):
        # 16-bit grayscale: map 0..65535 to 0..255 instead of letting PIL clip at 255
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) // 257).astype(np.uint8), "L")
    elif im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() or 1.0
        im = Image.fromarray((np.clip(arr, 0, None) * (255.0 / max(hi, 255.0))).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        im = Image.fromarray(((arr - lo) * (255.0 / ((hi - lo) or 1.0))).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(im)
        im = canvas
    return im.convert("RGB")


def decode(data: bytes, limits: DecodeLimits, budget: DecodeBudget | None = None) -> DecodedImage:
    """Decode ``data`` at working size or raise :class:`BadImage` naming the reason.

    ``budget``: held for the pixels being decompressed (the process's decode budget); None = unbounded.
    """
    if not data:
        raise BadImage("empty", "zero bytes")
    if data.startswith(b"\x89PNG") and _png_damaged(data):
        raise BadImage("corrupt", "PNG chunk checksum mismatch or missing end")
    if data.startswith(b"\xff\xd8") and jpeg_scans(data, limits.max_jpeg_scans) > limits.max_jpeg_scans:
        raise BadImage("too_many_scans", f"progressive JPEG with more than MEMETRACE_MAX_JPEG_SCANS="
                                         f"{limits.max_jpeg_scans} scans")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = im.size
        if w * h > limits.max_pixels:
            raise BadImage("too_many_pixels", f"{w}x{h} exceeds MEMETRACE_MAX_PIXELS={limits.max_pixels}")
        if min(w, h) < limits.min_side:
            raise BadImage("too_small", f"{w}x{h} is below MEMETRACE_MIN_SIDE={limits.min_side}")
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animations: the first frame stands for the image
        im.draft("RGB", _working_size(w, h, limits.max_side))  # JPEG: libjpeg scales down while decoding
        with budget.hold(im.size[0] * im.size[1]) if budget is not None else nullcontext():
            im.load()
            orientation = im.getexif().get(ExifTags.Base.Orientation)
            im = _shrink(im, limits.max_side)
            if isinstance(orientation, int) and orientation in _UPRIGHT:
                im = im.transpose(_UPRIGHT[orientation])
                if orientation >= 5:  # a quarter turn: the stored size is the upright one
                    w, h = h, w
            rgb = np.ascontiguousarray(np.asarray(_to_rgb(im), dtype=np.uint8))
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own cap, for max_pixels above it
        raise BadImage("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _looks_like_image(data):
            raise BadImage("corrupt", "image header present but unreadable") from exc
        raise BadImage("not_an_image", "no supported image format (JPEG, PNG, GIF, WebP, BMP, TIFF)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage("corrupt", str(exc)) from exc
    return DecodedImage(image_id=content_id(data), rgb=rgb, nbytes=len(data), width=w, height=h)


def make_thumbnail(rgb: np.ndarray, side: int) -> bytes:
    """The stored JPEG thumbnail of an image: longest side ``side`` (never enlarged), quality 80."""
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return buf.tobytes()
