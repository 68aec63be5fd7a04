"""Exact L2 descriptor search on the GPU when faiss-gpu (the ``gpu`` extra) sees one, else CPU FAISS."""

from __future__ import annotations

from functools import lru_cache

import faiss


@lru_cache(maxsize=1)
def _gpu_resources() -> object | None:
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return faiss.StandardGpuResources()  # one per process: it holds the GPU's scratch memory


def flat_l2_index(dim: int) -> faiss.Index:
    """``faiss.IndexFlatL2(dim)``, or its GPU twin (same results) with faiss-gpu and a visible GPU."""
    resources = _gpu_resources()
    if resources is None:
        return faiss.IndexFlatL2(dim)
    return faiss.GpuIndexFlatL2(resources, dim)
