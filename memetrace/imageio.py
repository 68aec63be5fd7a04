"""Turn untrusted bytes into an RGB image, or a reason why not.

Every image that enters memetrace goes through :func:`decode`: it hashes the bytes (the image id),
refuses what is empty, not an image, truncated, too small or a decompression bomb, and
normalises every mode (CMYK, alpha, 16-bit, palette, grayscale, first frame of animations)
to 8-bit RGB.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImage(Exception):
    """An input that cannot be indexed; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    image_id: int
    rgb: np.ndarray  # H x W x 3, uint8
    nbytes: int

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


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


def decode(data: bytes, *, max_pixels: int, min_side: int) -> DecodedImage:
    """Decode ``data`` or raise :class:`BadImage` naming the reason."""
    if not data:
        raise BadImage("empty", "zero bytes")
    if data.startswith(b"\x89PNG") and _png_damaged(data):
        raise BadImage("corrupt", "PNG chunk checksum mismatch or missing end")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = im.size
        if w * h > max_pixels:
            raise BadImage("too_many_pixels", f"{w}x{h} exceeds MEMETRACE_MAX_PIXELS={max_pixels}")
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animations: the first frame stands for the image
        im.load()
        im = ImageOps.exif_transpose(im)
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
    if min(im.size) < min_side:
        raise BadImage("too_small", f"{im.size[0]}x{im.size[1]} is below MEMETRACE_MIN_SIDE={min_side}")
    rgb = np.ascontiguousarray(np.asarray(_to_rgb(im), dtype=np.uint8))
    return DecodedImage(image_id=content_id(data), rgb=rgb, nbytes=len(data))
