"""The corpus ``memetrace demo`` indexes: real photos, their copies, distractors and bad files.

The photos are scikit-image's bundled sample images (public domain or CC0), read straight from the
installed package's ``data`` folder: skimage is never imported and pooch never asked to download,
so the demo works offline. Each group photo gets an original plus ``COPIES_PER_PHOTO`` copies made
with PIL (crop, rescale, JPEG q=30, meme caption, mirror, 2x2 collage, 8-degree rotation,
social-media screenshot); two unrelated photos are distractors; an empty file and a text file
named like an image show the bad-file handling.

``ground_truth.csv`` (columns ``path,group_id,role,transform``, paths relative to ``out_dir``):

* ``original`` / ``copy`` rows: ``group_id`` is the photo's name, ``transform`` what was done
  (``none`` for originals). A collage copy also holds a quarter of three *other* group photos:
  it belongs to the group whose photo it shows whole.
* ``distractor`` rows: empty ``group_id``, transform ``none``.
* ``bad`` rows: empty ``group_id``; ``transform`` is the reason code decode must give.

Everything is drawn from ``random.Random(seed)``, so one seed always gives the same bytes.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

PHOTO_PACKAGE = "skimage"  # distribution: scikit-image
# group name -> file in skimage/data, all in the wheel itself (none needs pooch)
GROUP_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "cameraman": "camera.png",  # grayscale: the copies stay gray-in-RGB
    "coins": "coins.png",
}
DISTRACTOR_PHOTOS: dict[str, str] = {"hubble": "hubble_deep_field.jpg", "retina": "retina.jpg"}
BAD_FILES: dict[str, tuple[bytes, str]] = {  # name -> (content, the reason decode must give)
    "empty.jpg": (b"", "empty"),
    "notes.png": (b"TODO: find the original of the cat picture\nthis is a text file, not a PNG\n", "not_an_image"),
}
COPIES_PER_PHOTO = 5
WORK_SIDE = 480  # longest side of the originals: small files and fast transforms, copies stay >> min_side
CSV_COLUMNS = ("path", "group_id", "role", "transform")

CAPTIONS = (
    "WHEN YOU FIND THE ORIGINAL",
    "NOBODY: ... ME: REPOSTING THIS",
    "IT'S NOT A COPY IF YOU CROP IT",
    "POV: THE REPOST OF A REPOST",
    "ME EXPLAINING THE JOKE",
    "THIS IS FINE",
)
USERS = ("memelord", "daily.pics", "nasa_fan_42", "cat_facts", "reposter", "coffee_addict")


class DemoPhotosMissing(RuntimeError):
    """The package that ships the demo photos is not installed."""


@dataclass(frozen=True)
class Saved:
    """How a transform's result is written: a format and its encoder options."""

    ext: str
    fmt: str
    params: dict[str, Any]


JPEG = Saved("jpg", "JPEG", {"quality": 85})
ORIGINAL = Saved("jpg", "JPEG", {"quality": 90})  # originals a notch better than their copies
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Transform = Callable[[Image.Image, random.Random, Sequence[Image.Image]], Image.Image]


def photo_dir() -> Path:
    """The installed scikit-image's sample-image folder, found without importing skimage."""
    spec = importlib.util.find_spec(PHOTO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoPhotosMissing("the demo photos come with scikit-image: pip install scikit-image")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in (*GROUP_PHOTOS.values(), *DISTRACTOR_PHOTOS.values()) if not (folder / f).is_file()]
    if missing:
        raise DemoPhotosMissing(f"scikit-image at {folder} lacks {', '.join(missing)}")
    return folder


def _load(path: Path) -> Image.Image:
    with Image.open(path) as f:
        im = f.convert("RGB")
    im.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS)  # shrink only, keeps aspect
    return im


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font, no system fonts needed
    except (ImportError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _fitted_font(draw: ImageDraw.ImageDraw, text: str, max_width: int, size: int) -> Font:
    """The largest font up to ``size`` in which ``text`` fits ``max_width`` pixels."""
    while size > 10 and draw.textlength(text, font=_font(size)) > max_width:
        size -= 2
    return _font(size)


def _text_centered(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font: Font,
                   fill: str) -> None:
    # textbbox instead of anchor="mm": anchors fail with the bitmap fallback font
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (box[0] + box[2] - (right - left)) // 2 - left
    y = (box[1] + box[3] - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=fill, font=font)


# --------------------------------------------------------------------------- transforms


def _crop(im: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """A window holding 30-60% of the area: a partial copy."""
    w, h = im.size
    area, aspect = rng.uniform(0.30, 0.60), rng.uniform(0.8, 1.25)
    cw = min(w, round(w * (area * aspect) ** 0.5))
    ch = min(h, round(h * (area / aspect) ** 0.5))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return im.crop((x, y, x + cw, y + ch))


def _rescale(im: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    f = rng.uniform(0.4, 0.7)
    return im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.BILINEAR)


def _jpeg_q30(im: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    return im.copy()  # the damage is in the encoding: see SAVE_AS


def _caption(im: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """A modern meme: white band on top with black caption text."""
    w, h = im.size
    band = max(48, h // 5)
    out = Image.new("RGB", (w, h + band), "white")
    out.paste(im, (0, band))
    draw = ImageDraw.Draw(out)
    text = rng.choice(CAPTIONS)
    font = _fitted_font(draw, text, w - 24, band // 2)
    _text_centered(draw, (0, 0, w, band), text, font, "black")
    return out


def _mirror(im: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    return ImageOps.mirror(im)


def _collage(im: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """2x2 grid: the photo whole in one cell, a quarter of another photo in each of the others."""
    cw = 300
    ch = round(cw * im.height / im.width)
    gap = 6
    cells = [im.resize((cw, ch), Image.Resampling.LANCZOS)]
    for other in rng.sample(list(others), 3):
        qx, qy = rng.randint(0, 1), rng.randint(0, 1)
        ow, oh = other.size
        quarter = other.crop((qx * ow // 2, qy * oh // 2, (qx + 1) * ow // 2, (qy + 1) * oh // 2))
        cells.append(ImageOps.fit(quarter, (cw, ch), Image.Resampling.LANCZOS))
    rng.shuffle(cells)
    out = Image.new("RGB", (2 * cw + 3 * gap, 2 * ch + 3 * gap), "white")
    for i, cell in enumerate(cells):
        out.paste(cell, (gap + (i % 2) * (cw + gap), gap + (i // 2) * (ch + gap)))
    return out


def _rotate(im: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    angle = rng.choice((8, -8))
    return im.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor="white")


def _screenshot(im: Image.Image, rng: random.Random, others: Sequence[Image.Image]) -> Image.Image:
    """The photo in a social-media post: app bar, card with header and action bar, page margins."""
    pw = 340
    ph = round(pw * im.height / im.width)
    pad, header, footer, margin, appbar = 14, 70, 40, 18, 44
    size = (pw + 2 * pad + 2 * margin, appbar + margin + header + ph + footer + margin)
    page = Image.new("RGB", size, (240, 242, 245))
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, page.width, appbar), fill=(59, 89, 152))
    draw.text((margin, 11), "feed", fill="white", font=_font(20))
    top = appbar + margin
    draw.rounded_rectangle((margin, top, page.width - margin, page.height - margin), radius=10,
                           fill="white", outline=(218, 221, 225))
    x0 = margin + pad
    draw.ellipse((x0, top + 10, x0 + 30, top + 40), fill=(rng.randrange(80, 220), rng.randrange(80, 220), 200))
    handle = f"@{rng.choice(USERS)}  \u00b7  {rng.randint(1, 23)}h"
    draw.text((x0 + 40, top + 12), handle, fill=(40, 40, 40), font=_font(14))
    draw.text((x0, top + 46), rng.choice(CAPTIONS).capitalize(), fill=(20, 20, 20), font=_font(14))
    page.paste(im.resize((pw, ph), Image.Resampling.LANCZOS), (x0, top + header))
    likes = (f"Like {rng.randint(2, 99)}{rng.choice(('', 'k'))}    Comment {rng.randint(1, 300)}    "
             f"Share {rng.randint(1, 999)}")
    draw.text((x0, top + header + ph + 12), likes, fill=(101, 103, 107), font=_font(13))
    return page


TRANSFORMS: dict[str, Transform] = {
    "crop": _crop,
    "rescale": _rescale,
    "jpeg_q30": _jpeg_q30,
    "caption": _caption,
    "mirror": _mirror,
    "collage": _collage,
    "rotate8": _rotate,
    "screenshot": _screenshot,
}
SAVE_AS: dict[str, Saved] = {  # formats vary as they do online; the rest are JPEG q=85
    "jpeg_q30": Saved("jpg", "JPEG", {"quality": 30}),
    "screenshot": Saved("png", "PNG", {}),
    "rescale": Saved("webp", "WEBP", {"quality": 80, "method": 4}),
}


# --------------------------------------------------------------------------- corpus


def _encode(im: Image.Image, saved: Saved) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=saved.fmt, **saved.params)
    return buf.getvalue()


def _forget_previous(out_dir: Path, images: Path) -> None:
    """Delete the files a previous demo corpus listed, so another seed leaves no stale copies.

    Only listed files directly inside ``images`` go: the CSV is never trusted to point elsewhere.
    """
    truth = out_dir / "ground_truth.csv"
    if not truth.is_file():
        return
    with truth.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            path = (out_dir / row.get("path", "")).resolve()
            if path.parent == images.resolve() and path.is_file():
                path.unlink()


def make_demo_corpus(out_dir: Path, seed: int = 0) -> Path:
    """Write the demo images and ``ground_truth.csv`` under ``out_dir``; return the folder to index.

    The returned folder is ``out_dir / "images"``; ground-truth paths are relative to ``out_dir``.
    """
    source = photo_dir()
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    _forget_previous(out_dir, images)

    groups = {name: _load(source / f) for name, f in GROUP_PHOTOS.items()}
    rows: list[tuple[str, str, str, str]] = []

    def write(name: str, data: bytes, group: str, role: str, transform: str) -> None:
        (images / name).write_bytes(data)
        rows.append((f"images/{name}", group, role, transform))

    # cycle through a seeded order of the transforms so every kind appears about equally often
    order = rng.sample(sorted(TRANSFORMS), k=len(TRANSFORMS))
    for i, (name, photo) in enumerate(groups.items()):
        write(f"{name}.jpg", _encode(photo, ORIGINAL), name, "original", "none")
        others = [p for n, p in groups.items() if n != name]
        for k in range(COPIES_PER_PHOTO):
            kind = order[(i * COPIES_PER_PHOTO + k) % len(order)]
            saved = SAVE_AS.get(kind, JPEG)
            copy = TRANSFORMS[kind](photo, rng, others)
            write(f"{name}_{kind}.{saved.ext}", _encode(copy, saved), name, "copy", kind)
    for name, f in DISTRACTOR_PHOTOS.items():
        write(f"{name}.jpg", _encode(_load(source / f), ORIGINAL), "", "distractor", "none")
    for name, (data, reason) in BAD_FILES.items():
        write(name, data, "", "bad", reason)

    # originals older than their copies, as in the wild: the gallery marks the earliest copy by file time
    born = time.time() - 86400
    for path, _, role, _ in rows:
        if role == "original":
            os.utime(out_dir / path, (born, born))
    with (out_dir / "ground_truth.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(sorted(rows))
    return images
