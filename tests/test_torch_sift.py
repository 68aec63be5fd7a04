"""memetrace.torch_sift: the torch SIFT agrees with OpenCV's, keeps the mirror permutation and the flat
filter, is chosen by MEMETRACE_LOCAL_FEATURES; its CUDA path (GPU decode, extraction) runs where CUDA is."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import cv2
import faiss
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from conftest import make_settings, rgb, sift_config
from memetrace.embedder import Embedder
from memetrace.errors import ConfigError
from memetrace.faiss_index import flat_l2_index
from memetrace import gpu
from memetrace.gpu import decode_rgb, embed_batch
from memetrace.keypoints import CONTRAST, FLAT_STD, KeypointExtractor, local_variance, resize_longest, window_share
from memetrace.local_features import build_extractor
from memetrace.torch_sift import TorchSiftExtractor, sift
from memetrace.torch_sift import local_variance as torch_local_variance
from memetrace.torch_sift import window_share as torch_window_share

SIFT = sift_config()
N, SIDE = SIFT.n_features, SIFT.max_side
CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """As the embedder sets it on 2 cores: more threads than free cores make OpenMP spin (10x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ratio_matches(a: np.ndarray, b: np.ndarray, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Lowe's ratio test, a -> b (OpenCV's brute-force L2 matcher)."""
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.astype(np.float32), b.astype(np.float32), k=2)
    good = [m for m, n in pairs if m.distance < ratio * n.distance]
    return np.array([m.queryIdx for m in good], int), np.array([m.trainIdx for m in good], int)


def _jpeg(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=95)
    return out.getvalue()


def _gray(im: Image.Image) -> np.ndarray:
    return resize_longest(cv2.cvtColor(rgb(im), cv2.COLOR_RGB2GRAY), SIDE)


@pytest.mark.parametrize("name", ["astronaut", "coins"])
def test_torch_and_opencv_keypoints_agree_on_a_photo(photos: dict[str, Image.Image], name: str) -> None:
    ours = TorchSiftExtractor(SIFT, CPU).extract(rgb(photos[name]))
    theirs = KeypointExtractor(SIFT).extract(rgb(photos[name]))
    assert (ours.width, ours.height) == (theirs.width, theirs.height)
    assert ours.xy.dtype == np.float32 and ours.desc.dtype == np.uint8 and ours.desc.shape == (len(ours), 128)
    assert 0.9 * len(theirs) <= len(ours) <= N
    qi, ti = _ratio_matches(ours.desc, theirs.desc)
    assert len(qi) >= 0.8 * len(ours), (len(qi), len(ours))
    h, inliers = cv2.findHomography(ours.xy[qi], theirs.xy[ti], cv2.RANSAC, 1.0)
    assert inliers.sum() >= 0.95 * len(qi)
    np.testing.assert_allclose(h, np.eye(3), atol=0.01)  # the same frame: no shift, no scale


def test_a_smooth_photo_keeps_as_many_points_as_with_opencv(photos: dict[str, Image.Image]) -> None:
    smooth = rgb(Image.open(io.BytesIO(_jpeg(photos["astronaut"].filter(ImageFilter.GaussianBlur(8))))))
    ours = TorchSiftExtractor(SIFT, CPU).extract(smooth)
    theirs = KeypointExtractor(SIFT).extract(smooth)
    assert len(theirs) >= 50  # the smooth rule's points (the flat test alone keeps 9)
    assert 0.8 * len(theirs) <= len(ours) <= 1.2 * len(theirs)  # 85 and 83


def test_same_points_get_the_same_descriptors_as_opencv(photos: dict[str, Image.Image]) -> None:
    gray = _gray(photos["cat"])
    kps, desc = cv2.SIFT_create(nfeatures=900, contrastThreshold=CONTRAST).detectAndCompute(gray, None)
    f = sift(torch.from_numpy(gray).float(), 900, CONTRAST)
    cv_xy = np.array([k.pt for k in kps], np.float32)
    dist = np.linalg.norm(cv_xy[:, None] - f.xy.numpy()[None], axis=2)
    nearest, close = dist.argmin(1), dist.min(1) < 0.1
    assert close.mean() >= 0.95  # OpenCV's keypoints are found again, at the same sub-pixel place
    same = close & np.isclose([k.size for k in kps], f.size.numpy()[nearest], rtol=0.01)
    diff = np.linalg.norm(desc[same].astype(float) - f.desc.numpy()[nearest[same]].astype(float), axis=1)
    assert same.sum() >= 0.9 * len(kps) and np.median(diff) < 5.0, (same.sum(), np.median(diff))  # norms are 512


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_mirror_permutation_holds_for_torch_descriptors(photos: dict[str, Image.Image], name: str) -> None:
    ex = TorchSiftExtractor(SIFT, CPU)
    mirrored = ex.extract(rgb(photos[name])).mirrored()
    flipped = ex.extract(rgb(ImageOps.mirror(photos[name])))
    fi, mi = _ratio_matches(flipped.desc, mirrored.desc)
    near = np.linalg.norm(flipped.xy[fi] - mirrored.xy[mi], axis=1) < 2.0
    assert near.sum() >= 0.7 * len(flipped), (near.sum(), len(flipped))


def test_flat_shares_on_the_device_equal_the_cpus(photos: dict[str, Image.Image]) -> None:
    gray = _gray(photos["astronaut"])
    gray[:120, :200] = 255  # a flat caption box, so that fractions span 0..1
    rng = np.random.default_rng(0)
    xy = (rng.random((300, 2)) * [gray.shape[1], gray.shape[0]]).astype(np.float32)
    sizes = (rng.random(300) * 20).astype(np.float32)
    var, torch_var = local_variance(gray), torch_local_variance(torch.from_numpy(gray))
    np.testing.assert_allclose(torch_var.numpy(), var, atol=0.05)  # what the 0.5, 2 and 16 std tests read
    expected = window_share(var < FLAT_STD ** 2, xy, sizes)
    got = torch_window_share(torch_var < FLAT_STD ** 2, torch.from_numpy(xy), torch.from_numpy(sizes)).numpy()
    assert expected.min() == 0.0 and expected.max() > 0.9
    np.testing.assert_allclose(got, expected, atol=0.01)


def test_blank_image_gives_no_keypoints() -> None:
    kp = TorchSiftExtractor(SIFT, CPU).extract(np.full((100, 120, 3), 128, np.uint8))
    assert len(kp) == 0 and kp.desc.shape == (0, 128) and (kp.width, kp.height) == (120, 100)


def test_the_setting_selects_the_extractor(tmp_path) -> None:
    assert type(build_extractor(make_settings(tmp_path))) is KeypointExtractor  # the default stays OpenCV
    ex = build_extractor(make_settings(tmp_path, local_features="torch", device="cpu", sift_features=150))
    assert isinstance(ex, TorchSiftExtractor) and ex.device == CPU and ex.config.n_features == 150
    with pytest.raises(ConfigError, match="MEMETRACE_SIFT_DETECT_HALF"):
        build_extractor(make_settings(tmp_path, local_features="torch", sift_detect_half=True))


def test_device_decode_and_resize_give_what_the_cpu_path_gives(photos: dict[str, Image.Image]) -> None:
    im = photos["astronaut"].resize((900, 700))
    data = _jpeg(im)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    got = gpu.resize_longest(gpu.gray(decode_rgb([data], CPU)[0]), SIDE).numpy()
    expected = resize_longest(cv2.cvtColor(np.ascontiguousarray(decoded), cv2.COLOR_RGB2GRAY), SIDE)
    assert got.shape == expected.shape == (348, 448)
    # libjpeg's and OpenCV's IDCTs differ slightly, and torch's area resize averages whole-pixel
    # windows where INTER_AREA weights fractional ones: a few grey levels at edges, none elsewhere
    diff = np.abs(got.astype(int) - expected)
    assert diff.mean() < 3 and np.median(diff) <= 1
    batch = embed_batch(decode_rgb([data, data], CPU), 224)
    reference = Embedder.preprocess(None, np.ascontiguousarray(decoded), 224)  # type: ignore[arg-type]
    assert batch.shape == (2, 3, 224, 224) and float((batch[0] - reference).abs().mean()) < 0.02


def test_flat_index_is_exact_l2_on_the_cpu() -> None:
    index = flat_l2_index(128)
    rng = np.random.default_rng(1)
    base = rng.random((50, 128), dtype=np.float32)
    index.add(base)
    _, idx = index.search(base[:5] + 1e-3, 1)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4]


@cuda
def test_cuda_extraction_matches_the_cpu_one(photos: dict[str, Image.Image]) -> None:
    on_device = gpu.resize_longest(gpu.gray(decode_rgb([_jpeg(photos["astronaut"])], torch.device("cuda"))[0]), SIDE)
    assert on_device.is_cuda and max(on_device.shape) == SIDE
    on_gpu = TorchSiftExtractor(SIFT, torch.device("cuda")).extract_gray(on_device)
    on_cpu = TorchSiftExtractor(SIFT, CPU).extract_gray(on_device.cpu())
    assert len(on_gpu) >= 0.9 * len(on_cpu)
    qi, ti = _ratio_matches(on_gpu.desc, on_cpu.desc)
    assert len(qi) >= 0.9 * len(on_gpu)
    assert np.median(np.linalg.norm(on_gpu.xy[qi] - on_cpu.xy[ti], axis=1)) < 0.1


@cuda
def test_cuda_embedding_batch_and_gpu_index(photos: dict[str, Image.Image]) -> None:
    gpu = torch.device("cuda")
    images = decode_rgb([_jpeg(photos["astronaut"]), _jpeg(photos["coins"])], gpu)
    batch = embed_batch(images, 224)
    assert batch.is_cuda and batch.shape == (2, 3, 224, 224)
    on_cpu = embed_batch([im.cpu() for im in images], 224)
    assert float((batch.cpu() - on_cpu).abs().max()) < 1e-3
    index = flat_l2_index(128)
    assert type(index).__name__ == ("GpuIndexFlatL2" if hasattr(faiss, "StandardGpuResources") else "IndexFlatL2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: make bench runs the section")
def test_gpu_bench_section_says_no_cuda_device() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not an installed package
    from benchmarks.gpu import format_gpu, gpu_section

    r = gpu_section([])
    assert r == {"skipped": "no CUDA device"} and format_gpu(r) == "GPU path: skipped (no CUDA device)"


# ---------------------------------------------------------------- the pipeline on a dev subset

SUBSET_EVERY = 8  # every 8th group of the dev split (10 of 75, ~110 images) and as many distractors


@pytest.fixture(scope="module")
def dev_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A documented subset of the dev split (the whole split with torch SIFT takes ~10 CPU-minutes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.run import DEFAULT_CACHE, bench_dir, bench_unavailable, generate, split_dir

    reason = bench_unavailable()
    if reason:
        pytest.skip(reason)
    bench = bench_dir()
    gt, _ = generate(bench, split_dir(bench, "dev"), DEFAULT_CACHE / "generated" / "dev")
    with gt.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    groups = sorted({r["group_id"] for r in rows if r["role"] != "distractor"})[::SUBSET_EVERY]
    keep = [r for r in rows if r["group_id"] in groups] + [r for r in rows if r["role"] == "distractor"][:len(groups)]
    out = tmp_path_factory.mktemp("dev-subset")
    (out / "images").mkdir()
    for r in keep:
        (out / r["path"]).symlink_to(gt.parent / r["path"])
    with (out / "ground_truth.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    return out / "ground_truth.csv"


def _pipeline_score(gt: Path, features: str, work: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from benchmarks.run import bench_dir, run_pipeline, score

    monkeypatch.setenv("MEMETRACE_LOCAL_FEATURES", features)
    run_pipeline(gt.parent / "images", work / features / "data", work / features / "clusters.csv")
    return score(bench_dir(), gt, work / features / "clusters.csv")


@pytest.mark.slow
def test_torch_features_score_like_opencv_on_a_dev_subset(dev_subset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ours = _pipeline_score(dev_subset, "torch", tmp_path, monkeypatch)
    theirs = _pipeline_score(dev_subset, "opencv", tmp_path, monkeypatch)
    for name, s in (("torch", ours), ("opencv", theirs)):
        print(f"\n{name}: F1 {s['cluster_f1']:.4f} P {s['cluster_precision']:.4f} R {s['cluster_recall']:.4f} "
              f"families {s['copy_with_original_rate_per_transform']}")
    assert ours["cluster_precision"] >= 0.99, ours
    assert ours["cluster_f1"] >= theirs["cluster_f1"] - 0.02, (ours["cluster_f1"], theirs["cluster_f1"])
    rates, reference = (s["copy_with_original_rate_per_transform"] for s in (ours, theirs))
    low = {f: (rates.get(f, 0.0), r) for f, r in reference.items() if rates.get(f, 0.0) < min(r, 0.85) - 0.05}
    assert not low, low  # a family holds a handful of copies here: one miss is 0.1
