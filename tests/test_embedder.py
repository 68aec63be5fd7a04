"""memetrace.embedder: weights conversion and loading, descriptor shape and quality, dtype choice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import jpeg_roundtrip, rgb
from memetrace.embedder import (
    Embedder,
    PrecisionCache,
    default_weights_path,
    gem,
    load_backbone,
    lukemelas_to_timm,
    pick_device,
    pick_dtype,
)
from memetrace.regions import GRID, content_boxes, crop

DIM = 320  # EfficientNet-Lite0's last stage


@pytest.fixture(scope="module")
def lukemelas_state() -> dict[str, torch.Tensor]:
    return torch.load(default_weights_path(), map_location="cpu", weights_only=True)


def test_lukemelas_to_timm_renames_every_key(lukemelas_state: dict[str, torch.Tensor]) -> None:
    assert len(lukemelas_state) == 296
    converted = lukemelas_to_timm(lukemelas_state)
    assert len(converted) == 296  # no two keys collapsed into one
    assert not any(k.startswith("_") or "._" in k for k in converted)  # no lukemelas name left
    expected = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(converted) == set(expected)
    for key, value in converted.items():
        assert value.shape == expected[key].shape, key
    # tensors are carried over, not copied or altered
    assert converted["conv_stem.weight"] is lukemelas_state["_conv_stem.weight"]
    assert converted["blocks.0.0.conv_dw.weight"] is lukemelas_state["_blocks.0._depthwise_conv.weight"]
    assert converted["blocks.6.0.conv_pwl.weight"] is lukemelas_state["_blocks.15._project_conv.weight"]
    assert converted["classifier.weight"] is lukemelas_state["_fc.weight"]


def test_packaged_weights_load_strictly() -> None:
    model = load_backbone("tf_efficientnet_lite0", None)
    assert not model.training
    with torch.inference_mode():
        fmap = model.forward_intermediates(torch.zeros(1, 3, 224, 224), indices=1, intermediates_only=True)[-1]
    assert tuple(fmap.shape) == (1, DIM, 7, 7)
    # the weights are the packaged ones, not timm's random initialisation
    state = lukemelas_to_timm(torch.load(default_weights_path(), map_location="cpu", weights_only=True))
    assert torch.equal(model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])


def test_weights_file_in_timm_layout_loads(tmp_path: Path, lukemelas_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": lukemelas_to_timm(lukemelas_state)}, path)
    model = load_backbone("tf_efficientnet_lite0", path)
    assert torch.equal(model.state_dict()["blocks.6.0.conv_pwl.weight"], lukemelas_state["_blocks.15._project_conv.weight"])


def test_missing_weights_file_names_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="MEMETRACE_MODEL_WEIGHTS") as exc:
        load_backbone("tf_efficientnet_lite0", missing)
    assert str(missing) in str(exc.value)


def test_other_model_without_weights_is_refused() -> None:
    with pytest.raises(ValueError, match="MEMETRACE_MODEL_WEIGHTS"):
        load_backbone("resnet18", None)


def test_embed_global_and_regions(embedder: Embedder, photos: dict[str, Image.Image]) -> None:
    assert embedder.dim == DIM
    images = [rgb(photos[n]) for n in ("astronaut", "coins", "rocket")]
    glob, regions = embedder.embed(images)
    assert glob.shape == (3, DIM) and glob.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(glob, axis=1), 1.0, atol=1e-5)
    assert len(regions) == 3
    for im, reg in zip(images, regions):
        assert reg.shape == (len(GRID) + len(content_boxes(im)), DIM)
        assert np.isfinite(reg).all()
        np.testing.assert_allclose(np.linalg.norm(reg, axis=1), 1.0, atol=1e-5)
    # the rocket photo has content boxes (checked, so the box branch is exercised)
    assert len(regions[2]) > len(GRID)


def test_given_boxes_are_embedded_as_crops(embedder: Embedder, photos: dict[str, Image.Image]) -> None:
    im = rgb(photos["cat"])
    box = (0.25, 0.25, 0.75, 0.75)
    glob, regions = embedder.embed([im, im], boxes=[[box], []])
    assert regions[0].shape == (len(GRID) + 1, DIM) and regions[1].shape == (len(GRID), DIM)
    np.testing.assert_allclose(regions[0][: len(GRID)], regions[1], atol=1e-5)
    crop_glob, _ = embedder.embed([crop(im, box)], boxes=[[]])
    np.testing.assert_allclose(regions[0][-1], crop_glob[0], atol=1e-4)


def test_without_the_grid_only_the_content_boxes_are_embedded(embedder: Embedder,
                                                               photos: dict[str, Image.Image]) -> None:
    """What the indexer stores by default (MEMETRACE_STORE_GRID_REGIONS=false): the boxes' descriptors
    alone, the same as with the grid windows before them; the global one unchanged."""
    inputs = [embedder.inputs(rgb(photos["rocket"]))]
    assert inputs[0].crops  # the rocket photo has content boxes
    glob, regions = embedder.embed_inputs(inputs)
    boxes_glob, boxes = embedder.embed_inputs(inputs, grid=False)
    assert boxes[0].shape == (len(inputs[0].crops), DIM)
    np.testing.assert_allclose(boxes[0], regions[0][len(GRID):], atol=1e-5)
    np.testing.assert_allclose(boxes_glob, glob, atol=1e-5)


def test_regions_can_be_turned_off(embedder: Embedder, photos: dict[str, Image.Image]) -> None:
    off = Embedder(replace(embedder.config, regions=False), model=embedder.model)
    glob, regions = off.embed([rgb(photos["coffee"])])
    assert glob.shape == (1, DIM) and regions[0].shape == (0, DIM)
    ref, _ = embedder.embed([rgb(photos["coffee"])])
    np.testing.assert_allclose(glob, ref, atol=1e-5)


def test_copies_are_close_and_different_photos_are_not(embedder: Embedder, photos: dict[str, Image.Image]) -> None:
    names = ("astronaut", "cat", "coffee", "coins")
    originals = [rgb(photos[n]) for n in names]
    jpegs = [rgb(jpeg_roundtrip(photos[n], 25)) for n in names]
    small = [rgb(photos[n].resize((photos[n].width // 2, photos[n].height // 2), Image.Resampling.BILINEAR))
             for n in names]
    g, _ = embedder.embed(originals + jpegs + small)
    orig, jp, sm = g[:4], g[4:8], g[8:]
    copy_sims = np.concatenate([(orig * jp).sum(1), (orig * sm).sum(1)])
    assert copy_sims.min() > 0.9, copy_sims
    cross = orig @ orig.T
    other_sims = cross[~np.eye(4, dtype=bool)]
    assert other_sims.max() < 0.85, other_sims
    assert copy_sims.min() - other_sims.max() > 0.1


def test_gem_pooling() -> None:
    fmap = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert gem(fmap, 1.0).item() == pytest.approx(2.5)
    assert gem(fmap, 3.0).item() == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3))
    assert gem(torch.full((1, 1, 2, 2), -5.0), 3.0).item() == pytest.approx(1e-6, rel=1e-3)  # clamped


@pytest.mark.parametrize(("seconds", "chosen"), [({"fp32": 1.0, "bf16": 0.18}, torch.bfloat16),  # native bf16
                                                   ({"fp32": 0.2, "bf16": 1.0}, torch.float32)])  # emulated
def test_auto_precision_follows_the_measurement(seconds: dict[str, float], chosen: torch.dtype) -> None:
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu, seconds.__getitem__) == chosen
    # GPUs: fp16; explicit settings always win, unmeasured
    assert pick_dtype("auto", torch.device("cuda"), seconds.__getitem__) == torch.float16
    assert pick_dtype("fp32", cpu, seconds.__getitem__) == torch.float32
    assert pick_dtype("bf16", cpu, seconds.__getitem__) == torch.bfloat16


def test_embedder_measures_auto_precision_once_per_machine(tmp_path: Path, embedder: Embedder) -> None:
    config = replace(embedder.config, precision="auto", device="cpu")
    calls: list[str] = []

    def slow_bf16(precision: str) -> float:
        calls.append(precision)
        return {"fp32": 0.1, "bf16": 0.5}[precision]

    cache = PrecisionCache(tmp_path / "precision.json")
    assert Embedder(config, model=embedder.model, probe=slow_bf16, cache=cache).dtype == torch.float32
    assert sorted(calls) == ["bf16", "fp32"]
    # the next start on this machine reads the cached choice instead of measuring again
    assert Embedder(config, model=embedder.model, probe=slow_bf16, cache=cache).dtype == torch.float32
    assert len(calls) == 2


def test_the_real_probe_times_both_precisions(tmp_path: Path, embedder: Embedder) -> None:
    config = replace(embedder.config, precision="auto", device="cpu")
    e = Embedder(config, model=embedder.model, cache=PrecisionCache(tmp_path / "none" / "precision.json"))
    seconds = {p: e._time_batch(p) for p in ("fp32", "bf16")}
    assert all(0 < s < 60 for s in seconds.values()), seconds
    assert e.dtype in (torch.float32, torch.bfloat16)


def test_frozen_fp32_forward_gives_the_eager_output(embedder: Embedder) -> None:
    e = Embedder(replace(embedder.config, precision="fp32", device="cpu"), model=embedder.model)
    batch = torch.rand(2, 3, 224, 224).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        frozen, eager = e._forward(batch), e._last_stage(batch)
    assert isinstance(e._frozen_by_size[224], torch.jit.ScriptModule)  # traced, not the eager fallback
    assert torch.allclose(frozen, eager, atol=1e-4)


def test_pick_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="MEMETRACE_DEVICE"):
        pick_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_matches_cpu(tmp_path: Path, embedder: Embedder, photos: dict[str, Image.Image]) -> None:
    config = replace(embedder.config, device="cuda", precision="fp16")
    # a fresh backbone: Embedder moves the module it is given, the shared CPU one must stay put
    gpu = Embedder(config, model=load_backbone(config.model_name, None))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    images = [rgb(photos[n]) for n in ("astronaut", "cat", "rocket")]
    g_gpu, r_gpu = gpu.embed(images)
    g_cpu, r_cpu = embedder.embed(images)
    assert g_gpu.dtype == np.float32 and np.isfinite(g_gpu).all()
    assert (g_gpu * g_cpu).sum(1).min() > 0.99
    for a, b in zip(r_gpu, r_cpu):
        assert a.shape == b.shape
        assert (a * b).sum(1).min() > 0.99
