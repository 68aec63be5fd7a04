"""Builds the shared components from one Settings object, each only when first needed."""

from __future__ import annotations

from functools import cached_property

from memetrace.catalog import Catalog
from memetrace.embedder import Embedder
from memetrace.feature_store import FeatureStore, LocalFeatureStore
from memetrace.keypoints import KeypointExtractor
from memetrace.milvus_store import MilvusStore, connect, stored_dim
from memetrace.settings import Settings


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def embedder(self) -> Embedder:
        return Embedder(self.settings)

    @cached_property
    def extractor(self) -> KeypointExtractor:
        s = self.settings
        return KeypointExtractor(s.sift_features, s.sift_max_side, s.sift_flat_max)

    @cached_property
    def store(self) -> MilvusStore:
        # services that never embed (match, cluster, serve) take the size from the stored collection
        client = connect(self.settings)
        dim = stored_dim(client, self.settings)
        return MilvusStore(self.settings, self.embedder.dim if dim is None else dim, client)

    @cached_property
    def features(self) -> FeatureStore:
        if self.settings.feature_store == "s3":
            from memetrace.s3_feature_store import S3FeatureStore  # boto3 only when used

            return S3FeatureStore.from_settings(self.settings)
        return LocalFeatureStore(self.settings.data_dir / "features")

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.settings.resolved_catalog_path())
