"""SIFT in torch, on a CPU or a CUDA device, giving what :class:`memetrace.keypoints.KeypointExtractor` gives.

The same algorithm as OpenCV's ``cv2.SIFT`` (Lowe's DoG detector as OpenCV implements it: the
input doubled, 3 layers per octave, sub-pixel refinement, contrast and edge tests, one keypoint per
orientation peak, 4 x 4 x 8 descriptors clipped at 0.2 and scaled by 512 to uint8) written as batched
tensor operations, so the whole extraction runs on the device that holds the image. Descriptors come
in OpenCV's layout and sign conventions (angles counter-clockwise with y down), so
``keypoints.MIRROR_PERMUTATION`` holds for them and they match OpenCV's (tests/test_torch_sift.py).
The flat-patch filter is ``KeypointExtractor.select`` over box filters computed on the device.

kornia's SIFT was measured first and left out: 5-9 s per 448 px image on 2 CPU cores (dense 3-D
refinement and NMS over the whole scale space), about 30x OpenCV, too slow for the CPU quality gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from memetrace.errors import ConfigError
from memetrace.keypoints import Detected, KeypointExtractor, Keypoints, SiftConfig

LAYERS = 3  # OpenCV's nOctaveLayers
SIGMA = 1.6
EDGE = 10.0
BORDER = 5  # SIFT_IMG_BORDER
INTERP_STEPS = 5
ORI_BINS = 36
ORI_PEAK = 0.8
D, N = 4, 8  # descriptor cells per side, orientation bins
DESC_SCALE = 3.0  # SIFT_DESCR_SCL_FCTR
DESC_MAG_THR = 0.2
MIN_OCTAVE_SIDE = 16  # OpenCV goes down to ~4 px; such octaves hold almost no keypoint that survives
CHUNK = 256  # keypoints per descriptor batch (a 77 x 77 window each at the largest scale)


# ---------------------------------------------------------------- filters


def _pad(x: torch.Tensor, p: int) -> torch.Tensor:
    # OpenCV's default border is BORDER_REFLECT_101, torch's "reflect"; it needs p < side
    mode = "reflect" if p < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (p, p, p, p), mode=mode)


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur on a float image (kernel size round(8 sigma + 1) | 1), x: 1 x 1 x H x W."""
    k = int(round(sigma * 8 + 1)) | 1
    r = k // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-(t * t) / (2 * sigma * sigma))
    w = w / w.sum()
    y = _pad(x, r)
    y = F.conv2d(y, w.view(1, 1, 1, k))
    return F.conv2d(y, w.view(1, 1, k, 1))


def _box_mean(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(_pad(x, 1), 3, stride=1)


def local_variance(gray: torch.Tensor) -> torch.Tensor:
    """:func:`memetrace.keypoints.local_variance` on the device; gray: H x W in 0..255."""
    g = gray[None, None].float()
    mean = _box_mean(g)
    return (_box_mean(g * g) - mean * mean)[0, 0]


def window_share(mask: torch.Tensor, xy: torch.Tensor, sizes: torch.Tensor, min_radius: float = 10.0) -> torch.Tensor:
    """:func:`memetrace.keypoints.window_share` on the device."""
    h, w = mask.shape
    integral = F.pad(mask.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    r = torch.clamp(sizes.double() * 1.5, min=min_radius)
    x, y = xy[:, 0].double(), xy[:, 1].double()
    x0 = torch.clamp(torch.floor(x - r), 0, w).long()
    x1 = torch.clamp(torch.ceil(x + r) + 1, 0, w).long()
    y0 = torch.clamp(torch.floor(y - r), 0, h).long()
    y1 = torch.clamp(torch.ceil(y + r) + 1, 0, h).long()
    area = torch.clamp((x1 - x0) * (y1 - y0), min=1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / area


# ---------------------------------------------------------------- scale space


def _pyramid(gray: torch.Tensor) -> list[torch.Tensor]:
    """Gaussian octaves (LAYERS + 3 images each, stacked: L x H x W) of the doubled image (OpenCV's
    firstOctave = -1, linear upsampling, the input assumed blurred by 0.5)."""
    x = F.interpolate(gray[None, None], scale_factor=2.0, mode="bilinear", align_corners=False)
    x = _gaussian(x, math.sqrt(max(SIGMA ** 2 - 1.0, 0.01)))
    k = 2.0 ** (1.0 / LAYERS)
    totals = [SIGMA * k ** i for i in range(LAYERS + 3)]
    steps = [math.sqrt(totals[i] ** 2 - totals[i - 1] ** 2) for i in range(1, LAYERS + 3)]
    octaves = []
    while min(x.shape[-2:]) >= MIN_OCTAVE_SIDE:
        images = [x]
        for s in steps:
            images.append(_gaussian(images[-1], s))
        octaves.append(torch.cat(images, 1)[0])
        x = images[LAYERS][:, :, ::2, ::2]  # OpenCV's INTER_NEAREST halving: pixel 2i
    return octaves


def _derivatives(dog: torch.Tensor, s: torch.Tensor, r: torch.Tensor, c: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient (x, y, s) and Hessian of the DoG at integer points, OpenCV's scales (image in 1/255)."""
    _, h, w = dog.shape
    flat, centre = dog.flatten(), (s * h + r) * w + c

    def at(ds: int, dr: int, dc: int) -> torch.Tensor:
        return flat[centre + (ds * h * w + dr * w + dc)]

    scale = 1.0 / 255
    v2 = 2 * at(0, 0, 0)
    grad = torch.stack([at(0, 0, 1) - at(0, 0, -1), at(0, 1, 0) - at(0, -1, 0), at(1, 0, 0) - at(-1, 0, 0)], -1)
    dxx = at(0, 0, 1) + at(0, 0, -1) - v2
    dyy = at(0, 1, 0) + at(0, -1, 0) - v2
    dss = at(1, 0, 0) + at(-1, 0, 0) - v2
    dxy = (at(0, 1, 1) - at(0, 1, -1) - at(0, -1, 1) + at(0, -1, -1)) * 0.25
    dxs = (at(1, 0, 1) - at(1, 0, -1) - at(-1, 0, 1) + at(-1, 0, -1)) * 0.25
    dys = (at(1, 1, 0) - at(1, -1, 0) - at(-1, 1, 0) + at(-1, -1, 0)) * 0.25
    hess = torch.stack([torch.stack([dxx, dxy, dxs], -1), torch.stack([dxy, dyy, dys], -1),
                        torch.stack([dxs, dys, dss], -1)], -2)
    return grad * (scale * 0.5), hess * scale


def _neighbourhood(x: torch.Tensor, op) -> torch.Tensor:
    """op (max or min) over each interior point's 3 x 3 x 3 neighbourhood: (L-2) x (H-2) x (W-2)."""
    for dim in range(3):
        n = x.shape[dim]
        x = op(op(x.narrow(dim, 0, n - 2), x.narrow(dim, 1, n - 2)), x.narrow(dim, 2, n - 2))
    return x


@dataclass
class _Found:
    """Refined extrema of one octave, in that octave's pixel frame."""
    layer: torch.Tensor  # long, 1..LAYERS
    r: torch.Tensor  # long
    c: torch.Tensor  # long
    offset: torch.Tensor  # K x 3 float (x, y, s)
    response: torch.Tensor


def _extrema(dog: torch.Tensor, contrast_threshold: float) -> _Found:
    """OpenCV's findScaleSpaceExtrema + adjustLocalExtrema, batched over the candidates."""
    _, h, w = dog.shape
    threshold = math.floor(0.5 * contrast_threshold / LAYERS * 255)
    # 3 x 3 x 3 extrema by separable maxima over shifted views (max_pool3d is several times slower
    # on a CPU); pixels within BORDER are never candidates, so the views skip the image's edge
    mid = dog[1:-1, 1:-1, 1:-1]
    peak_max, peak_min = _neighbourhood(dog, torch.maximum), _neighbourhood(dog, torch.minimum)
    cand = ((mid == peak_max) & (mid > threshold)) | ((mid == peak_min) & (mid < -threshold))
    inner = torch.zeros_like(cand)
    inner[:, BORDER - 1:h - BORDER - 1, BORDER - 1:w - BORDER - 1] = True
    s, r, c = torch.nonzero(cand & inner, as_tuple=True)
    s, r, c = s + 1, r + 1, c + 1
    done = torch.zeros_like(s, dtype=torch.bool)
    alive = torch.ones_like(done)
    offset = torch.zeros((len(s), 3), device=dog.device, dtype=dog.dtype)
    for _ in range(INTERP_STEPS):
        grad, hess = _derivatives(dog, s, r, c)
        solved, info = torch.linalg.solve_ex(hess, grad[..., None])
        step = torch.nan_to_num(-solved[..., 0], nan=2e6, posinf=2e6, neginf=-2e6)
        alive &= info == 0  # a singular Hessian: OpenCV's LU solve gives garbage that leaves the image
        todo = alive & ~done
        offset = torch.where(todo[:, None], step, offset)
        converged = todo & (step.abs() < 0.5).all(1)
        done |= converged
        moving = todo & ~converged
        alive &= ~(moving & (step.abs() > 1e6).any(1))
        move = torch.where(moving[:, None] & alive[:, None], torch.round(step), torch.zeros_like(step)).long()
        c, r, s = c + move[:, 0], r + move[:, 1], s + move[:, 2]
        inside = (s >= 1) & (s <= LAYERS) & (c >= BORDER) & (c < w - BORDER) & (r >= BORDER) & (r < h - BORDER)
        alive &= inside
        s, r, c = s.clamp(1, LAYERS), r.clamp(BORDER, h - BORDER - 1), c.clamp(BORDER, w - BORDER - 1)
    keep = alive & done
    s, r, c, offset = s[keep], r[keep], c[keep], offset[keep]
    grad, hess = _derivatives(dog, s, r, c)
    contrast = dog[s, r, c] / 255 + 0.5 * (grad * offset).sum(1)
    trace = hess[:, 0, 0] + hess[:, 1, 1]
    det = hess[:, 0, 0] * hess[:, 1, 1] - hess[:, 0, 1] ** 2
    ok = (contrast.abs() * LAYERS >= contrast_threshold) & (det > 0) & (trace * trace * EDGE < (EDGE + 1) ** 2 * det)
    return _Found(s[ok], r[ok], c[ok], offset[ok], contrast[ok].abs())


# ---------------------------------------------------------------- orientation and descriptor


def _gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude and angle (degrees, 0..360, y up as in OpenCV) of central differences; borders zero
    (OpenCV skips the outermost pixels)."""
    dx = torch.zeros_like(image)
    dy = torch.zeros_like(image)
    dx[1:-1, 1:-1] = image[1:-1, 2:] - image[1:-1, :-2]
    dy[1:-1, 1:-1] = image[:-2, 1:-1] - image[2:, 1:-1]
    return torch.sqrt(dx * dx + dy * dy), torch.rad2deg(torch.atan2(dy, dx)) % 360.0


def _window(mag: torch.Tensor, ang: torch.Tensor, r: torch.Tensor, c: torch.Tensor, radius: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per keypoint (2 radius + 1)^2 window around integer (r, c): offsets i (rows), j (cols) and the
    gradients there, zero outside the image's interior."""
    h, w = mag.shape
    t = torch.arange(-radius, radius + 1, device=mag.device)
    i, j = torch.meshgrid(t, t, indexing="ij")
    rows, cols = r[:, None, None] + i, c[:, None, None] + j
    valid = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    flat = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten(1)
    m = mag.flatten()[flat].view_as(rows) * valid
    a = ang.flatten()[flat].view_as(rows)
    return i.to(mag.dtype), j.to(mag.dtype), m, a


def _orientations(mag: torch.Tensor, ang: torch.Tensor, r: torch.Tensor, c: torch.Tensor, scl: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's calcOrientationHist and peak interpolation: (keypoint index, angle) for every peak of at
    least 0.8 of the highest."""
    radii = torch.round(4.5 * scl)
    sigma = 1.5 * scl
    i, j, m, a = _window(mag, ang, r, c, int(radii.max().item()))
    inside = (i.abs() <= radii[:, None, None]) & (j.abs() <= radii[:, None, None])
    weight = torch.exp(-(i * i + j * j) / (2 * sigma * sigma)[:, None, None]) * m * inside
    bins = torch.round(a * (ORI_BINS / 360.0)).long() % ORI_BINS
    hist = torch.zeros((len(r), ORI_BINS), device=mag.device, dtype=mag.dtype)
    hist.scatter_add_(1, bins.flatten(1), weight.flatten(1))
    smooth = (hist.roll(2, 1) + hist.roll(-2, 1)) / 16 + (hist.roll(1, 1) + hist.roll(-1, 1)) * 4 / 16 + hist * 6 / 16
    left, right = smooth.roll(1, 1), smooth.roll(-1, 1)
    peak = (smooth > left) & (smooth > right) & (smooth >= ORI_PEAK * smooth.max(1, keepdim=True).values)
    kp, b = torch.nonzero(peak, as_tuple=True)
    lv, cv, rv = left[kp, b], smooth[kp, b], right[kp, b]
    bin_ = (b.to(mag.dtype) + 0.5 * (lv - rv) / (lv - 2 * cv + rv)) % ORI_BINS
    angle = 360.0 - bin_ * (360.0 / ORI_BINS)
    return kp, torch.where((angle - 360.0).abs() < 1e-6, torch.zeros_like(angle), angle)


def _descriptors(mag: torch.Tensor, ang: torch.Tensor, xy: torch.Tensor, angle: torch.Tensor, scl: torch.Tensor
                 ) -> torch.Tensor:
    """OpenCV's calcSIFTDescriptor for keypoints on one Gaussian image: K x 128 uint8."""
    ori = 360.0 - angle
    ori = torch.where((ori - 360.0).abs() < 1e-6, torch.zeros_like(ori), ori)
    hist_width = DESC_SCALE * scl
    radius = int(torch.round(hist_width.max() * math.sqrt(2) * (D + 1) * 0.5).item())
    radius = min(radius, int(math.hypot(*mag.shape)))
    i, j, m, a = _window(mag, ang, torch.round(xy[:, 1]).long(), torch.round(xy[:, 0]).long(), radius)
    rad = torch.deg2rad(ori)[:, None, None]
    cos_t, sin_t = torch.cos(rad) / hist_width[:, None, None], torch.sin(rad) / hist_width[:, None, None]
    c_rot = j * cos_t - i * sin_t
    r_rot = j * sin_t + i * cos_t
    rbin, cbin = r_rot + D / 2 - 0.5, c_rot + D / 2 - 0.5
    # the window's square holds about twice the pixels of the rotated cells: work on those only
    at = torch.nonzero(((rbin > -1) & (rbin < D) & (cbin > -1) & (cbin < D) & (m > 0)).flatten())[:, 0]
    k = at // (m.shape[1] * m.shape[2])
    rbin, cbin, c_rot, r_rot = (t.flatten()[at] for t in (rbin, cbin, c_rot, r_rot))
    weight = m.flatten()[at] * torch.exp(-(c_rot * c_rot + r_rot * r_rot) / (D * D * 0.5))
    obin = (a.flatten()[at] - ori[k]) * (N / 360.0)
    obin = torch.where(obin < 0, obin + N, obin)
    r0, c0, o0 = torch.floor(rbin), torch.floor(cbin), torch.floor(obin)
    fr, fc, fo = rbin - r0, cbin - c0, obin - o0
    # histogram cells (D + 2)^2 x N per keypoint: cell row/col r0 + 1 (rbin > -1), bins wrap around
    base = k * ((D + 2) * (D + 2) * N) + ((r0.long() + 1) * (D + 2) + c0.long() + 1) * N
    o0 = o0.long() % N
    o1 = torch.where(o0 == N - 1, 0, o0 + 1)
    idx, val = [], []
    for dr, wr in ((0, weight * (1 - fr)), ((D + 2) * N, weight * fr)):
        for dc, wc in ((0, wr * (1 - fc)), (N, wr * fc)):
            idx += [base + dr + dc + o0, base + dr + dc + o1]
            val += [wc * (1 - fo), wc * fo]
    size = len(xy) * (D + 2) * (D + 2) * N
    hist = torch.bincount(torch.cat(idx), torch.cat(val), minlength=size)[:size].to(mag.dtype)
    desc = hist.view(-1, D + 2, D + 2, N)[:, 1:D + 1, 1:D + 1].reshape(-1, D * D * N)
    thr = desc.norm(dim=1, keepdim=True) * DESC_MAG_THR
    desc = torch.minimum(desc, thr)
    desc = desc * (512.0 / desc.norm(dim=1, keepdim=True).clamp(min=1.1920929e-07))
    return torch.round(desc).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- the extractor


def sift(gray: torch.Tensor, n_best: int, contrast: float) -> Detected[torch.Tensor]:
    """The ``n_best`` keypoints of strongest DoG response (in no order) and their descriptors, of a gray image
    (H x W float in 0..255, any device), as ``cv2.SIFT_create(nfeatures=n_best,
    contrastThreshold=contrast).detectAndCompute``."""
    octaves = _pyramid(gray.float())
    gradients: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    per_octave = []
    for o, gauss in enumerate(octaves):
        found = _extrema(gauss[1:] - gauss[:-1], contrast)
        if not len(found.r):
            continue
        layer = found.layer
        sigma_oct = SIGMA * 2.0 ** ((layer.to(gauss.dtype) + found.offset[:, 2]) / LAYERS)  # = size / 2
        xy_oct = torch.stack([found.c + found.offset[:, 0], found.r + found.offset[:, 1]], 1)
        for lay in layer.unique().tolist():
            sel = torch.nonzero(layer == lay)[:, 0]
            mag, ang = gradients.setdefault((o, lay), _gradients(gauss[lay]))
            kp, angle = _orientations(mag, ang, found.r[sel], found.c[sel], sigma_oct[sel])
            idx = sel[kp]
            per_octave.append((o, lay, xy_oct[idx], sigma_oct[idx], found.response[idx], angle))
    if not per_octave:
        empty = torch.zeros((0,), device=gray.device)
        return Detected(empty.view(0, 2), empty, empty, torch.zeros((0, 128), dtype=torch.uint8, device=gray.device))
    response = torch.cat([p[4] for p in per_octave])
    best = torch.argsort(-response, stable=True)[:n_best]
    group = torch.cat([torch.full_like(p[4], k, dtype=torch.long) for k, p in enumerate(per_octave)])
    offsets = np.cumsum([0] + [len(p[4]) for p in per_octave])
    xy, size, desc = [], [], []
    order = []
    for k, (o, lay, xy_oct, sigma_oct, _, angle) in enumerate(per_octave):
        pick = best[group[best] == k] - int(offsets[k])
        if not len(pick):
            continue
        pick = pick[torch.argsort(sigma_oct[pick])]  # a chunk's window is as wide as its largest scale needs
        mag, ang = gradients[(o, lay)]
        for start in range(0, len(pick), CHUNK):
            p = pick[start:start + CHUNK]
            desc.append(_descriptors(mag, ang, xy_oct[p], angle[p], sigma_oct[p]))
        # doubled-image frame -> input frame: x 2^o / 2, and the size (2 sigma) likewise
        xy.append(xy_oct[pick] * 2.0 ** (o - 1))
        size.append(sigma_oct[pick] * 2.0 ** o)
        order.append(pick + int(offsets[k]))
    return Detected(torch.cat(xy), torch.cat(size), response[torch.cat(order)], torch.cat(desc))


class TorchSiftExtractor(KeypointExtractor):
    """:class:`KeypointExtractor`'s contract (resize, 1.5x requested, flat filter, strongest kept) with
    :func:`sift` on ``device``; ``extract_gray`` takes an image already on the device (GPU decode)."""

    def __init__(self, config: SiftConfig, device: torch.device) -> None:
        if config.detect_half:
            raise ConfigError("MEMETRACE_SIFT_DETECT_HALF works with MEMETRACE_LOCAL_FEATURES=opencv only: "
                              "unset one of them")
        super().__init__(config)
        self.device = device

    def extract(self, rgb: np.ndarray) -> Keypoints:
        import cv2

        from memetrace.keypoints import resize_longest

        gray = resize_longest(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), self.config.max_side)
        return self.extract_gray(torch.from_numpy(gray).to(self.device))

    @torch.inference_mode()
    def extract_gray(self, gray: torch.Tensor) -> Keypoints:
        """gray: H x W (uint8 or float in 0..255), already resized to ``max_side``, on any device."""
        h, w = gray.shape
        f, keep = self.select(local_variance(gray), partial(sift, gray.float(), int(self.config.n_features * 1.5)),
                              lambda mask, found: window_share(mask, found.xy, found.size))
        idx = torch.nonzero(keep)[:, 0]
        idx = idx[torch.argsort(-f.response[idx], stable=True)[: self.config.n_features]]
        xy = f.xy[idx].float().cpu().numpy()
        return Keypoints(xy=np.ascontiguousarray(xy), desc=f.desc[idx].cpu().numpy(), width=w, height=h,
                         size=f.size[idx].float().cpu().numpy())
