"""Builds the shared components from one Settings object, each only when first needed."""

from __future__ import annotations

from functools import cached_property

from pymilvus import MilvusClient

from memetrace.cli.catalog import BatchCatalog, SqliteBatchCatalog
from memetrace.cluster_board import ClusterBoard
from memetrace.clusterer.state import GraphState, SqliteGraphState
from memetrace.embedder import Embedder
from memetrace.feature_store import FeatureStore, LocalFeatureStore
from memetrace.keypoints import KeypointExtractor
from memetrace.milvus import (MilvusClusterBoard, MilvusConfig, MilvusOccurrenceLog, MilvusVectorIndex, connect,
                              stored_dim)
from memetrace.occurrence_log import OccurrenceLog
from memetrace.settings import Settings
from memetrace.vector_index import VectorIndex


class Context:
    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        """``embedder``: one already loaded (a test session's, say) instead of one built on first use."""
        self.settings = settings
        if embedder is not None:
            self.embedder = embedder  # takes the place of the cached property below

    @cached_property
    def embedder(self) -> Embedder:
        return Embedder(self.settings)

    @cached_property
    def extractor(self) -> KeypointExtractor:
        s = self.settings
        return KeypointExtractor(s.sift_features, s.sift_max_side, s.sift_flat_max)

    @cached_property
    def milvus_config(self) -> MilvusConfig:
        return MilvusConfig.from_settings(self.settings)

    @cached_property
    def milvus(self) -> MilvusClient:
        """The one client the Milvus backends share."""
        return connect(self.milvus_config)

    @cached_property
    def index(self) -> VectorIndex:
        # services that never embed (match, cluster, serve) take the size from the stored collection
        dim = stored_dim(self.milvus, self.milvus_config)
        return MilvusVectorIndex(self.milvus, self.milvus_config, self.embedder.dim if dim is None else dim)

    @cached_property
    def occurrences(self) -> OccurrenceLog:
        return MilvusOccurrenceLog(self.milvus, self.milvus_config)

    @cached_property
    def board(self) -> ClusterBoard:
        return MilvusClusterBoard(self.milvus, self.milvus_config)

    @cached_property
    def features(self) -> FeatureStore:
        if self.settings.feature_store == "s3":
            from memetrace.s3_feature_store import S3FeatureStore  # boto3 only when used

            return S3FeatureStore.from_settings(self.settings)
        return LocalFeatureStore(self.settings.data_dir / "features")

    @cached_property
    def catalog(self) -> BatchCatalog:
        """The batch pipeline's record (two files, not one: see memetrace.cli.catalog)."""
        return SqliteBatchCatalog(self.settings.data_dir / "catalog.db")

    @cached_property
    def graph_state(self) -> GraphState:
        return SqliteGraphState(self.settings.resolved_cluster_state_path())
