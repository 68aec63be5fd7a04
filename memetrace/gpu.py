"""The device side of the GPU path: JPEG decode (nvJPEG through torchvision), resizing and the
CNN's input batch on the device (FAISS's GPU index: ``memetrace.faiss_index``). ``make bench``'s GPU
section (``benchmarks/gpu.py``) runs them; the ingest worker does not use them yet (it decodes on
the CPU, ``memetrace.imageio``, which also applies the decode limits).

Each function also runs on a CPU device (torchvision's libjpeg decoder), which is how the
tests check them without a GPU; ``tests/test_torch_sift.py``'s CUDA test runs them on CUDA when one
is visible. A keypoint extractor takes the gray image: ``TorchSiftExtractor.extract_gray``; the
embedder takes the batch: ``Embedder.embed_tensor`` (fp16 on CUDA, see ``memetrace.embedder``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(images: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEG files -> 3 x H x W uint8 tensors on ``device``, decoded there (one batched nvJPEG call on
    CUDA). Raises RuntimeError for a file that is not a decodable JPEG: the caller falls back to
    ``memetrace.imageio``, which also applies the decode limits."""
    return decode_jpeg([_bytes(d) for d in images], mode=ImageReadMode.RGB, device=device)


def resize_longest(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """``keypoints.resize_longest`` on the device: area averaging (OpenCV's INTER_AREA when shrinking),
    a C x H x W or H x W uint8 tensor in, the same kind out; never enlarges."""
    h, w = image.shape[-2:]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return image
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = image.reshape(1, -1, h, w).float()
    return F.interpolate(x, size=size, mode="area").round_().clamp_(0, 255).to(torch.uint8).reshape(
        *image.shape[:-2], *size)


def gray(rgb: torch.Tensor) -> torch.Tensor:
    """3 x H x W uint8 -> H x W uint8 with OpenCV's RGB2GRAY weights."""
    w = torch.tensor([0.299, 0.587, 0.114], device=rgb.device).view(3, 1, 1)
    return (rgb.float() * w).sum(0).round_().to(torch.uint8)


def embed_batch(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """The embedder's input (``Embedder.preprocess``: bicubic to size x size, [-1, 1]) built on the
    images' device: N x 3 x size x size float."""
    batch = [F.interpolate(im[None].float(), size=(size, size), mode="bicubic", align_corners=False)
             for im in images]
    return torch.cat(batch).clamp_(0, 255).div_(127.5).sub_(1.0)
