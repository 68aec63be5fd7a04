"""All configuration, read once from ``MEMETRACE_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every tunable of memetrace; pass an instance down instead of reading the environment."""

    model_config = SettingsConfigDict(env_prefix="MEMETRACE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("./memetrace-data"), description="where every local store lives")
    milvus_uri: str = Field("", description="Milvus URI; empty = Milvus Lite file in data_dir")
    milvus_token: str = ""
    milvus_collection_prefix: str = "memetrace"
    milvus_index_type: str = "FLAT"
    milvus_metric: Literal["IP", "COSINE", "L2"] = "IP"
    catalog_path: Path | None = Field(None, description="SQLite catalog; empty = data_dir/catalog.db")

    # embedder
    model_name: str = "tf_efficientnet_lite0"
    model_weights: Path | None = Field(
        None, description="local weights file for model_name; empty = the installed EfficientNet-Lite0 package"
    )
    image_size: int = 224
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = 32
    gem_p: float = 3.0
    regions: bool = Field(True, description="store regional descriptors for partial copies")

    # keypoints
    sift_features: int = 600
    sift_max_side: int = 512
    sift_flat_max: float = Field(0.35, description="drop keypoints whose patch is flatter than this (text, UI)")
    thumbnail_side: int = 160

    # decoding guards
    max_pixels: int = 60_000_000
    min_side: int = 32
    max_file_bytes: int = 50_000_000

    # matching
    candidates_k: int = 10
    candidate_min_similarity: float = 0.45
    ratio_test: float = 0.8
    min_inliers: int = 10
    ransac_reproj_px: float = 6.0
    min_coverage: float = Field(0.6, description="share of one image's keypoints the match must explain")
    same_frame_min_coverage: float = Field(
        0.7, description="same, for both images, when the match is the identity (shared app frames)")
    coverage_radius: float = Field(0.05, description="radius around matched points, share of the longest side")
    workers: int = Field(2, description="threads for decoding and SIFT")

    # clustering
    cluster_algorithm: Literal["components", "louvain"] = "components"

    def resolved_milvus_uri(self) -> str:
        return self.milvus_uri or str(self.data_dir / "milvus.db")

    def resolved_catalog_path(self) -> Path:
        return self.catalog_path or self.data_dir / "catalog.db"
