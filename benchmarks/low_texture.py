"""Low-texture photos: are smooth images linked to their copies, and never to each other?

    .venv/bin/python -m benchmarks.low_texture [--out DIR]

Builds, from images that ship in installed packages (scikit-image's and matplotlib's sample
data; nothing downloaded, nothing stored in git), a set of smooth pictures the flat-patch filter
leaves with few keypoints: photos blurred to skies and soft shading, a sky cut out of a rocket
launch, gradients and flat graphics. Each smooth photo gets five near-exact copies (25 %
rescale, JPEG quality 40, grayscale, mirrored, 6 % cropped off each side). The whole set goes through
``memetrace index`` (:func:`memetrace.cli.batch.run_index`) four times: with neither of the two ways
smooth photos are verified, with the smooth images' keypoints only (``sift_smooth_points``), with the
low-texture rule only (``low_texture_points``), and with both (the defaults); the report gives per
run the copies clustered with their original and the false links (images of different sources in
one cluster).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

SIDE = 480
# scikit-image sample photos blurred into smooth ones: (file, blur radius as a share of the side)
BLURRED = (("astronaut.png", 1 / 60), ("coffee.png", 1 / 60), ("chelsea.png", 1 / 70), ("camera.png", 1 / 60),
           ("motorcycle_left.png", 1 / 60), ("coins.png", 1 / 50), ("ihc.png", 1 / 50),
           ("hubble_deep_field.jpg", 1 / 80))
ORIGINAL = "orig"
COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {}


def _copy(name: str) -> Callable[[Callable[[Image.Image], Image.Image]], Callable[[Image.Image], Image.Image]]:
    def register(f: Callable[[Image.Image], Image.Image]) -> Callable[[Image.Image], Image.Image]:
        COPIES[name] = f
        return f
    return register


@_copy("rescaled")
def rescaled(im: Image.Image) -> Image.Image:
    return im.resize((max(1, im.width // 4), max(1, im.height // 4)), Image.Resampling.LANCZOS)


@_copy("recompressed")
def recompressed(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=40)
    with Image.open(io.BytesIO(buf.getvalue())) as f:
        return f.convert("RGB")


@_copy("grayscale")
def grayscale(im: Image.Image) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


@_copy("mirrored")
def mirrored(im: Image.Image) -> Image.Image:
    return ImageOps.mirror(im)


@_copy("cropped")
def cropped(im: Image.Image, share: float = 0.06) -> Image.Image:
    dx, dy = round(im.width * share), round(im.height * share)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


def _sample(name: str) -> Image.Image:
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / name) as f:
        im = f.convert("RGB")
    im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    return im


def smooth_photos() -> dict[str, Image.Image]:
    """Packaged photos made smooth: blurred scenes and the sky above a rocket launch."""
    out = {}
    for file, share in BLURRED:
        im = _sample(file)
        out[file.split(".")[0]] = im.filter(ImageFilter.GaussianBlur(max(im.size) * share))
    rocket = _sample("rocket.jpg")
    out["rocket_sky"] = rocket.crop((0, 0, rocket.width, rocket.height // 2)).filter(ImageFilter.GaussianBlur(3))
    return out


def _gradient(w: int, h: int, top: tuple[int, int, int], bottom: tuple[int, int, int], angle: float) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * x / w + np.sin(angle) * y / h)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    px = np.asarray(top, np.float32) * (1 - t[..., None]) + np.asarray(bottom, np.float32) * t[..., None]
    return Image.fromarray(px.astype(np.uint8))


def distractors() -> dict[str, Image.Image]:
    """Smooth pictures unlike each other and unlike the photos: gradients (sky-coloured ones
    among them), flat graphics, and blurred crops of other packaged samples."""
    out = {f"gradient{i}": _gradient(480, 320, top, bottom, angle) for i, (top, bottom, angle) in enumerate((
        ((90, 140, 220), (200, 225, 250), 1.57), ((70, 120, 210), (230, 240, 255), 1.4),
        ((250, 180, 120), (90, 110, 200), 1.6), ((30, 30, 60), (120, 150, 220), 1.2),
        ((255, 255, 255), (120, 120, 120), 0.0), ((200, 60, 60), (250, 220, 90), 0.8)))}
    for i, (bg, fg) in enumerate((((240, 240, 240), (30, 90, 200)), ((20, 20, 20), (240, 200, 40)),
                                  ((90, 160, 230), (250, 250, 250)))):
        im = Image.new("RGB", (480, 360), bg)
        d = ImageDraw.Draw(im)
        d.ellipse((60 + 40 * i, 60, 260 + 40 * i, 260), fill=fg)
        d.rectangle((300, 80 + 30 * i, 440, 300), fill=tuple(255 - c for c in fg))
        out[f"graphic{i}"] = im.filter(ImageFilter.GaussianBlur(2))
    # samples none of the photos comes from (the rocket's lower half: the sky photo is its upper half)
    for file in ("retina.jpg", "moon.png", "brick.png", "grass.png", "gravel.png", "rocket.jpg", "color.png"):
        im = _sample(file)
        w, h = im.size
        out[f"{file.split('.')[0]}_soft"] = im.crop((0, h // 2, w, h)).filter(ImageFilter.GaussianBlur(max(w, h) / 40))
    return out


def write_set(folder: Path, photos: Collection[str] | None = None,
              others: Collection[str] | None = None) -> dict[str, str]:
    """The photos, their copies and the distractors as files in ``folder`` (``photos``, ``others``:
    only those names): file name -> source."""
    folder.mkdir(parents=True, exist_ok=True)
    source = {}
    for name, im in smooth_photos().items():
        for kind, edit in {ORIGINAL: lambda x: x, **COPIES}.items():
            file = f"{name}__{kind}.{'png' if kind == ORIGINAL else 'jpg'}"
            if photos is None or name in photos:
                edit(im).save(folder / file, quality=92)
                source[file] = name
    for name, im in distractors().items():
        if others is not None and name not in others:
            continue
        file = f"distractor_{name}.png"
        im.save(folder / file)
        source[file] = file
    return source


def score(clusters: dict[str, str], source: dict[str, str]) -> dict:
    """``clusters``: file name -> cluster id (unclustered files absent). Copies found = copies in
    their original's cluster; false links = pairs of files of different sources in one cluster."""
    found = {kind: 0 for kind in COPIES}
    for file, src in source.items():
        kind = file.split("__")[-1].split(".")[0]
        orig = f"{src}__{ORIGINAL}.png"
        if kind in COPIES and file in clusters and clusters[file] == clusters.get(orig):
            found[kind] += 1
    members: dict[str, list[str]] = {}
    for file, cid in clusters.items():
        members.setdefault(cid, []).append(source[file])
    false_links = sum(sum(1 for j in range(i + 1, len(m)) if m[i] != m[j])
                      for m in members.values() for i in range(len(m)))
    photos = sum(1 for f in source if f.endswith(f"__{ORIGINAL}.png"))
    return {"copies_found": found, "copies_each": photos, "false_links": false_links}


def run(folder: Path, data: Path, **overrides) -> dict:
    from memetrace.cli.batch import run_index
    from memetrace.cli.context import Context
    from memetrace.cli.tables import cluster_table
    from memetrace.settings import Settings

    c = Context(Settings(_env_file=None, data_dir=data, **overrides))
    run_index(c, folder, show_progress=False)
    return {Path(r.path).name: str(r.cluster_id) for r in cluster_table(c) if r.cluster_id is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.low_texture", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="results JSON file (default: print only)")
    a = ap.parse_args(argv)
    for key in [k for k in os.environ if k.upper().startswith("MEMETRACE_")]:
        del os.environ[key]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        source = write_set(folder)
        runs = (("neither", {"low_texture_points": 0, "sift_smooth_points": 0}),
                ("smooth_keypoints_only", {"low_texture_points": 0}), ("rule_only", {"sift_smooth_points": 0}),
                ("both", {}))
        result = {name: score(run(folder, Path(tmp) / name, **overrides), source) for name, overrides in runs}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
