"""``make bench``'s GPU section: the device ingest path's throughput on one CUDA GPU.

    .venv/bin/python -m benchmarks.gpu [--split-dir DIR] [--limit N]

Times, on the split's JPEG files (read into memory first): nvJPEG decode (:func:`memetrace.gpu.decode_rgb`,
batches of ``batch_size``), gray + resize + torch SIFT (:class:`memetrace.torch_sift.TorchSiftExtractor`)
and the CNN in its CUDA precision (fp16 under ``precision=auto``) on batches built on the device
(:func:`memetrace.gpu.embed_batch`). Storing is not timed here. Without a CUDA device it returns
``{"skipped": "no CUDA device"}`` and prints that.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

SKIPPED = {"skipped": "no CUDA device"}


def _timed(step: dict[str, float], name: str, fn):  # noqa: ANN001, ANN202 - any step
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    step[name] = step.get(name, 0.0) + time.perf_counter() - t0
    return out


def gpu_section(files: list[Path], limit: int = 2000) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return dict(SKIPPED)
    from memetrace.embedder import EmbedConfig, Embedder
    from memetrace.gpu import decode_rgb, embed_batch, gray, resize_longest
    from memetrace.keypoints import SiftConfig
    from memetrace.settings import Settings
    from memetrace.torch_sift import TorchSiftExtractor

    s = Settings(device="cuda")
    device = torch.device("cuda")
    data = [f.read_bytes() for f in files if f.suffix.lower() in (".jpg", ".jpeg")][:limit]
    embedder = Embedder(EmbedConfig.from_settings(s))
    extractor = TorchSiftExtractor(SiftConfig.from_settings(s), device)
    steps: dict[str, float] = {}

    def batch(chunk: list[bytes]) -> None:
        images = _timed(steps, "decode_s", lambda: decode_rgb(chunk, device))
        _timed(steps, "keypoints_s", lambda: [extractor.extract_gray(resize_longest(gray(im), s.sift_max_side))
                                              for im in images])
        _timed(steps, "embed_s", lambda: embedder.embed_tensor(embed_batch(images, s.image_size)))

    batch(data[: s.batch_size])  # warm-up: CUDA context, nvJPEG, kernels
    steps.clear()
    t0 = time.perf_counter()
    for start in range(0, len(data), s.batch_size):
        batch(data[start:start + s.batch_size])
    total = time.perf_counter() - t0
    return {"device": torch.cuda.get_device_name(), "images": len(data), "images_per_s": round(len(data) / total, 1),
            "dtype": str(embedder.dtype), **{k: round(v, 3) for k, v in steps.items()}}


def format_gpu(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"GPU path: skipped ({r['skipped']})"
    return (f"GPU path on {r['device']}: {r['images']} JPEGs, {r['images_per_s']} images/s "
            f"(decode {r['decode_s']} s, keypoints {r['keypoints_s']} s, embed {r['embed_s']} s, {r['dtype']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".bench/generated/dev")
    ap.add_argument("--limit", type=int, default=2000)
    args = ap.parse_args(argv)
    files = sorted(p for p in args.split_dir.rglob("*") if p.is_file())
    print(format_gpu(gpu_section(files, args.limit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
