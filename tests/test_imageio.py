"""memetrace.imageio.decode on every kind of bad and unusual input a crawl brings in.

Every fixture is made here with PIL/numpy and written under tmp_path, so the bytes decode sees are
the bytes of a real file on disk. Bad inputs must fail with one exact reason code; unusual but
valid ones must come out as H x W x 3 uint8 with the pixels a person would expect.
"""

from __future__ import annotations

import io
import resource
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from memetrace.decode_budget import DecodeBudget
from memetrace.imageio import BadImage, DecodedImage, DecodeLimits, content_id, decode, jpeg_scans

MAX_PIXELS = 60_000_000  # the Settings default
MIN_SIDE = 32

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def _save(tmp_path: Path, name: str, im: Image.Image, fmt: str, **params: Any) -> bytes:
    """Write ``im`` to tmp_path/name and return the file's bytes, as the indexer would read them."""
    path = tmp_path / name
    im.save(path, format=fmt, **params)
    return path.read_bytes()


def _write(tmp_path: Path, name: str, data: bytes) -> bytes:
    path = tmp_path / name
    path.write_bytes(data)
    return path.read_bytes()


def _scene(w: int = 128, h: int = 96) -> Image.Image:
    """A photo-like RGB picture: smooth gradients (compress like a photo) and a red top-left block."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // (w - 1)), (y * 255 // (h - 1)), ((x + y) * 255 // (w + h - 2))], axis=-1)
    arr = arr.astype(np.uint8)
    arr[: h // 2, : w // 2] = RED
    return Image.fromarray(arr, "RGB")


def _noise_png(tmp_path: Path) -> bytes:
    """A PNG whose IDAT is large and incompressible, like a real photo's, so damage hits the pixels."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    return _save(tmp_path, "noise.png", Image.fromarray(arr, "RGB"), "PNG")


def _decode(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> DecodedImage:
    return decode(data, DecodeLimits(max_pixels=max_pixels, min_side=min_side))


def _reason(data: bytes, **kwargs: int) -> str:
    with pytest.raises(BadImage) as info:
        _decode(data, **kwargs)
    return info.value.reason


def _check_rgb(img: DecodedImage, h: int, w: int) -> np.ndarray:
    rgb = img.rgb
    assert rgb.dtype == np.uint8
    assert rgb.shape == (h, w, 3)
    assert rgb.flags["C_CONTIGUOUS"]
    assert (img.height, img.width) == (h, w)
    return rgb


def _close(pixel: np.ndarray, expected: tuple[int, int, int], tol: int) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(expected)) <= tol))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _idat_offsets(data: bytes) -> tuple[int, int]:
    """(start of the first IDAT's payload, its length)."""
    at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    return at + 4, length


# --------------------------------------------------------------------------- bad inputs


def test_empty_file_is_empty(tmp_path: Path) -> None:
    assert _reason(_write(tmp_path, "empty.jpg", b"")) == "empty"


@pytest.mark.parametrize(
    "name, data",
    [
        ("notes.jpg", b"just some notes, not a picture\n" * 20),
        ("page.png", b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>\n"),
        ("logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="9"/></svg>'),
        ("blob.gif", bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8))),
    ],
    ids=["text", "html", "svg", "random-bytes"],
)
def test_non_image_bytes_are_not_an_image(tmp_path: Path, name: str, data: bytes) -> None:
    assert _reason(_write(tmp_path, name, data)) == "not_an_image"


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_truncated_jpeg_is_corrupt(tmp_path: Path, progressive: bool) -> None:
    # PIL itself only decodes a truncated JPEG "successfully" (grey bottom) when
    # ImageFile.LOAD_TRUNCATED_IMAGES is set; decode relies on that flag staying off.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    whole = _save(tmp_path, "whole.jpg", _scene(320, 240), "JPEG", quality=90, progressive=progressive)
    assert _decode(whole).rgb.shape == (240, 320, 3)
    half = _write(tmp_path, "half.jpg", whole[: len(whole) // 2])
    with pytest.raises(BadImage) as info:
        _decode(half)
    assert info.value.reason == "corrupt"
    assert "truncated" in info.value.detail


def test_truncated_png_is_corrupt(tmp_path: Path) -> None:
    whole = _noise_png(tmp_path)
    assert _reason(_write(tmp_path, "half.png", whole[: len(whole) // 2])) == "corrupt"


def test_png_with_garbage_in_the_middle_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(_noise_png(tmp_path))
    mid = len(data) // 2
    data[mid : mid + 256] = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes()
    assert _reason(_write(tmp_path, "garbled.png", bytes(data))) == "corrupt"


def test_png_with_bad_idat_crc_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(_noise_png(tmp_path))
    start, length = _idat_offsets(bytes(data))
    data[start + length] ^= 0xFF  # first byte of the IDAT's CRC
    assert _reason(_write(tmp_path, "badcrc.png", bytes(data))) == "corrupt"


def test_png_with_bad_header_crc_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(_noise_png(tmp_path))
    data[8 + 8 + 13] ^= 0xFF  # signature, IHDR length+type, 13-byte IHDR body: its CRC
    assert _reason(_write(tmp_path, "badhdr.png", bytes(data))) == "corrupt"


@pytest.mark.parametrize("size", [(8, 8), (400, 8), (31, 500)], ids=["8x8", "thin", "just-below"])
def test_tiny_image_is_too_small(tmp_path: Path, size: tuple[int, int]) -> None:
    data = _save(tmp_path, "tiny.png", Image.new("RGB", size, BLUE), "PNG")
    assert _reason(data) == "too_small"


def test_min_side_itself_is_accepted(tmp_path: Path) -> None:
    data = _save(tmp_path, "edge.png", Image.new("RGB", (MIN_SIDE, MIN_SIDE), BLUE), "PNG")
    _check_rgb(_decode(data), MIN_SIDE, MIN_SIDE)


def _bomb_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit grayscale PNG of width x height zeros, hand-written so nothing is allocated.

    Decoded by PIL it would take width*height bytes ("1" mode keeps a byte per pixel); on disk it is
    a few hundred KiB because rows of zeros deflate ~1000:1.
    """
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = 1000
    comp = zlib.compressobj(1)
    parts = [comp.compress(row * rows_per_block) for _ in range(height // rows_per_block)]
    parts += [comp.compress(row * (height % rows_per_block)), comp.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "width, height, max_pixels",
    [(30_000, 30_000, MAX_PIXELS), (6_000, 6_000, 10_000_000)],
    ids=["beyond-pil-limit", "beyond-max-pixels-only"],
)
def test_decompression_bomb_is_refused_before_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int, height: int, max_pixels: int
) -> None:
    data = _write(tmp_path, "bomb.png", _bomb_png(width, height))
    assert len(data) < 1_000_000
    assert struct.unpack(">II", data[16:24]) == (width, height)  # what the IHDR declares

    def no_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("decode loaded the pixels of a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadImage) as info:
        _decode(data, max_pixels=max_pixels)
    assert info.value.reason == "too_many_pixels"
    # the full image would be width*height bytes (>= 36 MB); the peak RSS must not have moved by that
    grown_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib) * 1024
    assert grown_bytes < width * height // 2


# --------------------------------------------------------------------------- unusual but valid


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    im = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    im.paste((255, 255, 0, 0), (32, 0, 64, 48))  # cyan+magenta: blue
    data = _save(tmp_path, "cmyk.jpg", im, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rgb = _check_rgb(_decode(data), 48, 64)
    assert _close(rgb[24, 10], RED, 12)
    assert _close(rgb[24, 54], BLUE, 12)


def test_rgba_png_transparent_areas_become_white(tmp_path: Path) -> None:
    arr = np.zeros((40, 60, 4), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0, 255)  # opaque red
    arr[:, 20:40] = (0, 255, 0, 0)  # fully transparent, green underneath: must not show
    arr[:, 40:] = (0, 0, 0, 128)  # half-transparent black over white: mid grey
    data = _save(tmp_path, "rgba.png", Image.fromarray(arr, "RGBA"), "PNG")
    rgb = _check_rgb(_decode(data), 40, 60)
    assert (rgb[:, :20] == RED).all()
    assert (rgb[:, 20:40] == WHITE).all()
    assert _close(rgb[20, 50], (127, 127, 127), 2)


def test_la_png_transparent_areas_become_white(tmp_path: Path) -> None:
    lum = Image.new("L", (50, 40), 60)
    alpha = Image.new("L", (50, 40), 255)
    alpha.paste(0, (25, 0, 50, 40))
    data = _save(tmp_path, "la.png", Image.merge("LA", (lum, alpha)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    rgb = _check_rgb(_decode(data), 40, 50)
    assert (rgb[:, :25] == 60).all()
    assert (rgb[:, 25:] == 255).all()


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (48, 36), 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 - 3) * 3)
    im.paste(1, (0, 0, 24, 36))  # left: palette 1 = red
    im.paste(2, (24, 0, 36, 36))  # palette 2 = blue; right of it stays index 0 = transparent
    data = _save(tmp_path, "pal.png", im, "PNG", transparency=0)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info
    rgb = _check_rgb(_decode(data), 36, 48)
    assert (rgb[:, :24] == RED).all()
    assert (rgb[:, 24:36] == BLUE).all()
    assert (rgb[:, 36:] == WHITE).all()  # index 0 is black in the palette but transparent


def test_16bit_grayscale_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    arr = np.tile(ramp, (40, 1))
    data = _save(tmp_path, "gray16.png", Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = _check_rgb(_decode(data), 40, 64)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    row = rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)  # still a ramp, not clipped to 255
    assert np.abs(row - ramp.astype(int) // 257).max() <= 1
    assert (rgb < 255).mean() > 0.9


def test_grayscale_png_and_jpeg(tmp_path: Path) -> None:
    im = Image.new("L", (64, 48), 100)
    im.paste(200, (0, 0, 32, 48))
    for fmt, name, tol in (("PNG", "gray.png", 0), ("JPEG", "gray.jpg", 3)):
        rgb = _check_rgb(_decode(_save(tmp_path, name, im, fmt)), 48, 64)
        assert _close(rgb[24, 10], (200, 200, 200), tol)
        assert _close(rgb[24, 54], (100, 100, 100), tol)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (60, 40), c) for c in (RED, GREEN, BLUE)]
    data = _save(tmp_path, "anim.gif", frames[0], "GIF", save_all=True, append_images=frames[1:],
                 duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    rgb = _check_rgb(_decode(data), 40, 60)
    assert (rgb == RED).all()


@pytest.mark.parametrize(
    "fmt, name, params, tol",
    [
        ("WEBP", "img.webp", {"lossless": True}, 0),
        ("WEBP", "img_lossy.webp", {"quality": 90}, 40),
        ("BMP", "img.bmp", {}, 0),
        ("TIFF", "img.tif", {"compression": "tiff_lzw"}, 0),
        ("PNG", "img.png", {}, 0),
        ("JPEG", "img.jpg", {"quality": 95}, 12),
    ],
    ids=["webp-lossless", "webp-lossy", "bmp", "tiff", "png", "jpeg"],
)
def test_common_formats_decode_to_rgb(tmp_path: Path, fmt: str, name: str, params: dict[str, Any], tol: int) -> None:
    scene = _scene()
    rgb = _check_rgb(_decode(_save(tmp_path, name, scene, fmt, **params)), 96, 128)
    expected = np.asarray(scene)
    assert _close(rgb[20, 20], RED, tol)
    if tol == 0:
        assert (rgb == expected).all()
    else:
        assert np.abs(rgb.astype(int) - expected).mean() < 6


def test_exif_rotated_jpeg_is_transposed(tmp_path: Path) -> None:
    stored = Image.new("RGB", (96, 64), (128, 128, 128))
    stored.paste(RED, (0, 0, 48, 32))  # the stored image's top-left quarter
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display = stored rotated 90 degrees clockwise
    data = _save(tmp_path, "rotated.jpg", stored, "JPEG", quality=95, exif=exif)
    img = _decode(data)
    rgb = _check_rgb(img, 96, 64)  # width and height swap
    # rotated clockwise, the stored top-left quarter lands top-right
    assert _close(rgb[10, 54], RED, 12)
    assert _close(rgb[10, 10], (128, 128, 128), 12)
    assert _close(rgb[85, 54], (128, 128, 128), 12)


# --------------------------------------------------------------------------- ids


def test_content_id(tmp_path: Path) -> None:
    a = _save(tmp_path, "a.png", _scene(), "PNG")
    b = _save(tmp_path, "b.png", _scene().transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG")
    same = bytes(bytearray(a))  # equal bytes, distinct object
    assert content_id(a) == content_id(same)
    assert content_id(a) != content_id(b)
    assert content_id(a) != content_id(a + b"\x00")  # one trailing byte is another file
    for data in (a, b, b"", b"x"):
        cid = content_id(data)
        assert isinstance(cid, int) and 0 < cid < 2**63  # a positive signed int64 primary key
    img = _decode(a)
    assert img.image_id == content_id(a)
    assert img.nbytes == len(a)
    assert _decode(same).image_id == img.image_id


# --------------------------------------------------------------------------- progressive scans


def _progressive_jpeg(side: int = 1024) -> bytes:
    y, x = np.mgrid[0:side, 0:side]
    arr = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", progressive=True, quality=90)
    return out.getvalue()


def _repeat_a_scan(data: bytes, times: int) -> bytes:
    """``data`` with its shortest scan (SOS header and entropy-coded data) repeated before the EOI."""
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"] + [len(data) - 2]
    scan = min((data[a:b] for a, b in zip(starts, starts[1:])), key=len)
    assert data.endswith(b"\xff\xd9")
    return data[:-2] + scan * times + data[-2:]


def test_scans_are_counted_from_markers() -> None:
    progressive = _progressive_jpeg(128)
    out = io.BytesIO()
    Image.open(io.BytesIO(progressive)).save(out, format="JPEG")
    assert jpeg_scans(out.getvalue(), stop_after=100) == 1  # baseline, interleaved: one scan
    assert jpeg_scans(progressive, stop_after=100) == 10  # libjpeg's progressive script for YCbCr
    assert jpeg_scans(_repeat_a_scan(progressive, 40), stop_after=100) == 50
    assert jpeg_scans(_repeat_a_scan(progressive, 500), stop_after=100) == 101  # stops counting early


def test_normal_progressive_jpeg_decodes() -> None:
    rgb = _decode(_repeat_a_scan(_progressive_jpeg(128), 80)).rgb  # 90 scans: under the default 100
    assert rgb.shape == (128, 128, 3)


@pytest.mark.parametrize("scans", [1_000, 10_000])
def test_progressive_jpeg_with_too_many_scans_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch, scans: int
) -> None:
    data = _repeat_a_scan(_progressive_jpeg(), scans)  # 10,000 scans: ~0.4 MB, about a second of PIL decoding

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("decode handed a JPEG with too many scans to PIL")

    monkeypatch.setattr(Image, "open", no_open)
    with pytest.raises(BadImage) as info:
        _decode(data)
    assert info.value.reason == "too_many_scans" and "MEMETRACE_MAX_JPEG_SCANS=100" in info.value.detail


# --------------------------------------------------------------------------- working size


def _photo(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, ((x // 50 + y // 50) % 2) * 200], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_large_images_are_kept_at_working_size_with_their_original_size(tmp_path: Path, fmt: str) -> None:
    photo = _photo(4000, 3000)
    data = _save(tmp_path, f"big.{fmt.lower()}", photo, fmt, quality=95)
    budget = DecodeBudget(10**9)
    img = decode(data, DecodeLimits(max_side=448), budget)
    assert img.rgb.shape == (336, 448, 3) and (img.width, img.height) == (4000, 3000)
    expected = np.asarray(photo.resize((448, 336), Image.Resampling.BOX)).astype(int)
    assert np.abs(img.rgb.astype(int) - expected).mean() < 8  # JPEG and libjpeg scaling blur the edges
    # JPEG: libjpeg decoded at 1/8 scale (500 x 375); the others are decompressed whole first
    assert budget.peak == (500 * 375 if fmt == "JPEG" else 4000 * 3000) and budget.in_flight == 0


def test_small_images_keep_their_pixels(tmp_path: Path) -> None:
    scene = _scene()
    img = decode(_save(tmp_path, "small.png", scene, "PNG"), DecodeLimits(max_side=448))
    assert (img.rgb == np.asarray(scene)).all()


def test_palette_image_is_averaged_not_picked_when_shrunk(tmp_path: Path) -> None:
    stripes = Image.new("P", (1000, 800), 0)
    stripes.putpalette([0, 0, 0, 255, 255, 255] + [0] * 254 * 3)
    for x in range(0, 1000, 2):
        stripes.paste(1, (x, 0, x + 1, 800))  # one-pixel black and white stripes
    img = decode(_save(tmp_path, "stripes.png", stripes, "PNG"), DecodeLimits(max_side=100))
    assert img.rgb.shape == (80, 100, 3)
    assert np.abs(img.rgb.astype(int) - 127).max() <= 2  # grey: not the stripes nearest sampling keeps


def test_exif_rotated_large_jpeg_reports_the_upright_size(tmp_path: Path) -> None:
    stored = _photo(2000, 1000)
    stored.paste(RED, (0, 0, 1000, 500))
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    img = decode(_save(tmp_path, "rotated-big.jpg", stored, "JPEG", quality=95, exif=exif), DecodeLimits(max_side=400))
    assert img.rgb.shape == (400, 200, 3) and (img.width, img.height) == (1000, 2000)
    assert _close(img.rgb[50, 150], RED, 16)  # the stored top-left quarter lands top-right


def test_refusals_hold_no_budget(tmp_path: Path) -> None:
    budget = DecodeBudget(1000)
    with pytest.raises(BadImage):
        decode(_write(tmp_path, "cut.png", _save(tmp_path, "whole.png", _scene(), "PNG")[:-40]), DecodeLimits(), budget)
    with pytest.raises(BadImage):
        decode(_save(tmp_path, "tiny.png", Image.new("RGB", (8, 8)), "PNG"), DecodeLimits(), budget)
    assert budget.in_flight == 0
