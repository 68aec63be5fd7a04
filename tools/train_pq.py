"""Train what storage compaction ships in ``memetrace/data/``, on a data dir's stores.

    .venv/bin/python -m tools.train_pq [--m 16]                # keypoint codebook (memetrace.kpcodec)
    .venv/bin/python -m tools.train_pq --pca 128 DATA_DIR      # descriptor basis (ReducedVectorIndex)

The codebook: FAISS k-means, 256 centroids per sub-vector, of the SIFT of scikit-image's packaged
photos (the demo's, none of the benchmark's) at several sizes and turns, extracted as ingest does.
The basis needs whole descriptors (``MEMETRACE_VECTOR_DIMS=0``): the top right singular vectors of
every global and regional descriptor of a data dir (uncentred: the index compares inner products);
the shipped one was trained on a benchmark split (make_bench.py --seed 7, not the dev split).
Both are then fixed: stored data refers to them, so retraining means re-indexing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np

from memetrace.keypoints import rootsift
from memetrace.kpcodec import DATA

MAX_TRAIN = 200_000  # descriptors: k-means of 256 centroids converges far below this


def train(descriptors: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """M x 256 x (128 / M) float16 centroids of the RootSIFT of ``descriptors``."""
    x = rootsift(descriptors)
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(x[rng.permutation(len(x))[:MAX_TRAIN]])
    pq = faiss.ProductQuantizer(128, m, 8)
    pq.train(x)
    return faiss.vector_to_array(pq.centroids).reshape(m, 256, 128 // m).astype(np.float16)


SIDES = (448, 320, 224)  # ingest's size and smaller: the same detail at other scales


def packaged_descriptors() -> np.ndarray:
    """SIFT descriptors of every colour or grey photo scikit-image ships, as ingest extracts them."""
    from PIL import Image

    from memetrace.cli.demo import photo_dir
    from memetrace.local_features import build_extractor
    from memetrace.settings import Settings

    extractor = build_extractor(Settings(local_features="opencv"))
    out = []
    for path in sorted(photo_dir().glob("*.png")) + sorted(photo_dir().glob("*.jpg")):
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        for side in SIDES:
            for turn in (0, 90):
                turned = rgb.rotate(turn, expand=True)
                scale = side / max(turned.size)
                sized = turned.resize((max(1, round(turned.width * scale)), max(1, round(turned.height * scale))))
                out.append(extractor.extract(np.asarray(sized)).desc)
    return np.concatenate(out)


def train_basis(vectors: np.ndarray, dims: int) -> np.ndarray:
    """D x ``dims``: the leading right singular vectors of ``vectors`` (N x D)."""
    _, _, vt = np.linalg.svd(vectors.astype(np.float64), full_matrices=False)
    return vt[:dims].T.astype(np.float32)


def stored_vectors(data_dir: Path) -> tuple[str, np.ndarray]:
    """(model name, every global and regional descriptor) of a data dir's Milvus Lite."""
    from memetrace.cli.context import Context
    from memetrace.settings import Settings

    s = Settings(data_dir=data_dir, milvus_uri="", cluster_state_path=None, vector_dims=0)
    c = Context(s)
    _, glob, regs = c.index.vectors(sorted(c.catalog.images()), with_regions=True)
    c.milvus.close()
    return s.model_name, np.concatenate([glob, *regs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path, nargs="?", help="the data dir whose descriptors --pca trains on")
    ap.add_argument("--m", type=int, default=16, help="sub-vectors (bytes per descriptor); divides 128")
    ap.add_argument("--pca", type=int, default=0, help="train the descriptor basis of this many dimensions instead")
    ap.add_argument("--out", type=Path, default=None,
                    help="default memetrace/data/pq<M>_rootsift.npy or pca<N>_<model>.npy")
    a = ap.parse_args()
    if a.pca:
        if a.data_dir is None:
            ap.error("--pca trains on a data dir's descriptors: give DATA_DIR")
        model, vectors = stored_vectors(a.data_dir)
        out = a.out or DATA / f"pca{a.pca}_{model}.npy"
        np.save(out, train_basis(vectors, a.pca))
        print(f"{out}: trained on {len(vectors)} descriptors")
        return
    out = a.out or DATA / f"pq{a.m}_rootsift.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    desc = packaged_descriptors()
    np.save(out, train(desc, a.m))
    print(f"{out}: trained on {min(len(desc), MAX_TRAIN)} of {len(desc)} descriptors")


if __name__ == "__main__":
    main()
