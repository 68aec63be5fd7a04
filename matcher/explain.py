"""Why two images match: the pair side by side, the verified keypoint pairs joined by lines and the
shared region boxed in each (``memetrace explain A B``, ``GET /v1/explain``).

Lifecycle::

    image bytes / stored id --side_of_bytes() / side_of_stored()--> Side (pixels, file size, keypoints)
    Side a + Side b --explain()--> Explanation (geometry and inlier lines, or none: no verified match)
    Explanation --draw()--> PIL image: a then b scaled to one height, a caption strip below

The pair is verified exactly as the matcher verifies it (the same :class:`Verifier`), so the
picture shows the model the match was accepted on. A pair that does not match is still drawn,
with the caption "no verified match" and no lines: the picture answers "why not" as well.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from memetrace.components import Components
from memetrace.decode_budget import DecodeBudget
from memetrace.imageio import DecodeLimits, decode
from memetrace.keypoints import KeypointExtractor, Keypoints
from memetrace.matcher.overlay import gray_of_rgb, is_overlay
from memetrace.matcher.stored import FeaturesMissing, NotStored, file_or_id
from memetrace.matcher.verify import Prepared, Verifier, VerifyConfig, geometry
from memetrace.models import Geometry

HEIGHT = 480  # pixels both images are drawn at
CAPTION = 28  # pixels of the caption strip under them
MAX_LINES = 120  # inlier lines drawn (an even sample): more only hide the images
BOX = (0, 230, 90)
LINE = (255, 200, 0)


@dataclass(frozen=True)
class Side:
    """One image of the pair: what is drawn, its file's size and the keypoints it is verified with."""

    rgb: np.ndarray  # H x W x 3 uint8, any size with the file's aspect ratio (a thumbnail will do)
    size: tuple[int, int]  # width, height of the file: the geometry's pixels
    keypoints: Keypoints
    label: str


@dataclass(frozen=True)
class Explanation:
    geometry: Geometry | None  # None: no verified match
    kind: str | None  # full | partial
    lines: np.ndarray  # K x 4 inlier pairs in file pixels: x, y in a, x, y in b


def side_of_bytes(data: bytes, label: str, extractor: KeypointExtractor, limits: DecodeLimits,
                  budget: DecodeBudget | None = None) -> Side:
    """Decode ``data`` (raises :class:`memetrace.imageio.BadImage`) and extract its keypoints."""
    image = decode(data, limits, budget)
    return Side(image.rgb, (image.width, image.height), extractor.extract(image.rgb), label)


def side_of_stored(ctx: Components, image_id: int, limits: DecodeLimits) -> Side:
    """A stored image: its stored keypoints, drawn from its file when this machine can read it, else
    from its thumbnail (a URL-ingested image); raises NotStored, FeaturesMissing."""
    row = ctx.index.get([image_id]).get(image_id)
    if row is None:
        raise NotStored(image_id)
    if (kp := ctx.features.get_keypoints(image_id)) is None:
        raise FeaturesMissing(image_id)
    path = Path(row.path)
    if path.is_file():
        rgb = decode(path.read_bytes(), limits).rgb
    elif (thumb := ctx.features.get_thumbnail(image_id)) is not None:
        rgb = np.asarray(Image.open(io.BytesIO(thumb)).convert("RGB"))
    else:
        rgb = np.full((max(1, kp.height), max(1, kp.width), 3), 128, np.uint8)  # nothing to show: grey
    return Side(rgb, (row.width, row.height), kp, row.path)


def side_of_argument(arg: str, ctx: Components, limits: DecodeLimits) -> Side:
    """A file path, else a stored image id (raises :class:`~memetrace.matcher.stored.NotStored`,
    :class:`~memetrace.matcher.stored.FeaturesMissing`, :class:`~memetrace.imageio.BadImage`)."""
    named = file_or_id(arg)
    if isinstance(named, Path):
        return side_of_bytes(named.read_bytes(), arg, ctx.extractor, limits)
    return side_of_stored(ctx, named, limits)


def explain(a: Side, b: Side, config: VerifyConfig, thumbnail_side: int) -> Explanation:
    """Verify a against b as the matcher does, and keep what the picture needs; ``thumbnail_side``:
    that of the stored thumbnails, at which the overlay check compares the two pictures."""
    pa, pb = Prepared(a.keypoints), Prepared(b.keypoints)
    found = Verifier(config).verify_many(pa, [pb], lambda v: is_overlay(
        pa, gray_of_rgb(a.rgb, thumbnail_side), pb, gray_of_rgb(b.rgb, thumbnail_side), v, config))
    if not found:
        return Explanation(None, None, np.zeros((0, 4), np.float32))
    v = found[0]
    scale = np.array([a.size[0] / pa.width, a.size[1] / pa.height, b.size[0] / pb.width, b.size[1] / pb.height])
    return Explanation(geometry(v, pa, pb, a.size, b.size, config.coverage_radius), v.kind, v.pairs * scale)


def caption(e: Explanation) -> str:
    g = e.geometry
    if g is None:
        return "no verified match"
    turn = f", turned {g.rotation:g} deg" if abs(g.rotation) >= 1 else ""
    return f"{g.inliers} inliers, {e.kind}, scale {g.scale:.2f}{turn}{', mirrored' if g.mirrored else ''}"


def scaled_width(size: tuple[int, int], height: int = HEIGHT) -> int:
    """Width an image of ``size`` is drawn at, ``height`` pixels high."""
    return max(1, round(size[0] * height / size[1]))


def draw(a: Side, b: Side, e: Explanation, height: int = HEIGHT) -> Image.Image:
    """a then b, both ``height`` high (total width: the sum of their scaled widths), the caption below."""
    wa, wb = scaled_width(a.size, height), scaled_width(b.size, height)
    canvas = Image.new("RGB", (wa + wb, height + CAPTION), (255, 255, 255))
    canvas.paste(Image.fromarray(a.rgb).resize((wa, height), Image.Resampling.LANCZOS), (0, 0))
    canvas.paste(Image.fromarray(b.rgb).resize((wb, height), Image.Resampling.LANCZOS), (wa, 0))
    pen = ImageDraw.Draw(canvas)
    fa, fb = height / a.size[1], height / b.size[1]  # file pixels -> drawn pixels
    step = max(1, len(e.lines) // MAX_LINES)
    for xa, ya, xb, yb in e.lines[::step]:
        pen.line([(xa * fa, ya * fa), (wa + xb * fb, yb * fb)], fill=LINE, width=1)
    if e.geometry is not None:
        for (x0, y0, x1, y1), f, dx in ((e.geometry.box_a, fa, 0), (e.geometry.box_b, fb, wa)):
            pen.rectangle([dx + x0 * f, y0 * f, dx + x1 * f - 1, y1 * f - 1], outline=BOX, width=3)
    pen.text((6, height + 6), caption(e), fill=(0, 0, 0), font=ImageFont.load_default(14))
    return canvas


def png(a: Side, b: Side, config: VerifyConfig, thumbnail_side: int) -> tuple[bytes, Explanation]:
    """The picture of the pair as PNG bytes, and what it shows (``thumbnail_side``: as :func:`explain`)."""
    e = explain(a, b, config, thumbnail_side)
    out = io.BytesIO()
    draw(a, b, e).save(out, format="PNG")
    return out.getvalue(), e
