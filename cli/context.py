"""Builds the shared components from one Settings object, each only when first needed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, TypeVar

from memetrace.settings import Settings

if TYPE_CHECKING:  # the heavy modules (torch, pymilvus) load on first use: `memetrace --help` stays fast
    from pymilvus import MilvusClient

    from memetrace.cli.catalog import BatchCatalog
    from memetrace.cluster_board import ClusterBoard
    from memetrace.clusterer.state import GraphState
    from memetrace.clusterer.tree_update import TreeEdgeCache
    from memetrace.tree_store import TreeStore
    from memetrace.embedder import Embedder
    from memetrace.feature_store import FeatureStore
    from memetrace.keypoints import KeypointExtractor
    from memetrace.matcher.matching import Matcher
    from memetrace.milvus import MilvusConfig
    from memetrace.models import Match
    from memetrace.occurrence_log import OccurrenceLog
    from memetrace.vector_index import VectorIndex

T = TypeVar("T")


class Context:
    """The components of one process, each built from the settings on first use."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        """``embedder``: one already loaded (a test session's, say) instead of one built on first use."""
        self.settings = settings
        self._blas_undo: list[Callable[[], None]] = []
        if embedder is not None:
            self.embedder = embedder  # takes the place of the cached property below

    @cached_property
    def embedder(self) -> Embedder:
        from memetrace.embedder import EmbedConfig, Embedder

        return self._loaded(Embedder(EmbedConfig.from_settings(self.settings)))

    @cached_property
    def extractor(self) -> KeypointExtractor:
        from memetrace.local_features import build_extractor

        return self._loaded(build_extractor(self.settings))

    @cached_property
    def milvus_config(self) -> MilvusConfig:
        from memetrace.milvus import MilvusConfig

        return MilvusConfig.from_settings(self.settings)

    @cached_property
    def milvus(self) -> MilvusClient:
        """The one client the Milvus backends share."""
        from memetrace.milvus import connect

        return connect(self.milvus_config)

    @cached_property
    def index(self) -> VectorIndex:
        from memetrace.milvus import MilvusVectorIndex, stored_dim
        from memetrace.vector_index import open_index

        # services that never embed (match, cluster, serve) take the size from the stored collection
        return open_index(lambda d: MilvusVectorIndex(self.milvus, self.milvus_config, d),
                          stored_dim(self.milvus, self.milvus_config), lambda: self.embedder.dim,
                          self.settings.vector_dims, self.settings.model_name)

    @cached_property
    def occurrences(self) -> OccurrenceLog:
        from memetrace.milvus import MilvusOccurrenceLog

        return MilvusOccurrenceLog(self.milvus, self.milvus_config)

    @cached_property
    def board(self) -> ClusterBoard:
        from memetrace.milvus import MilvusClusterBoard

        return MilvusClusterBoard(self.milvus, self.milvus_config)

    @cached_property
    def features(self) -> FeatureStore:
        from memetrace.feature_store import LocalFeatureStore
        from memetrace.kpcodec import KeypointCodec

        store: FeatureStore
        if self.settings.feature_store == "s3":
            from memetrace.s3_feature_store import S3FeatureStore  # boto3 only when used

            store = S3FeatureStore.from_settings(self.settings)
        else:
            store = LocalFeatureStore(self.settings.data_dir / "features")
        store.codec = KeypointCodec.from_settings(self.settings)
        return self._loaded(store)

    @cached_property
    def catalog(self) -> BatchCatalog:
        """The batch pipeline's record (two files, not one: see memetrace.cli.catalog)."""
        from memetrace.cli.catalog import SqliteBatchCatalog

        return SqliteBatchCatalog(self.settings.data_dir / "catalog.db")

    @cached_property
    def graph_state(self) -> GraphState:
        from memetrace.clusterer.state import SqliteGraphState

        return SqliteGraphState(self.settings.resolved_cluster_state_path())

    @cached_property
    def trees(self) -> TreeStore:
        """Derivation trees of the clusters (memetrace.tree_store), next to the clusterer state."""
        from memetrace.tree_store import SqliteTreeStore

        return SqliteTreeStore(self.settings.resolved_cluster_state_path().with_name("trees.db"))

    @cached_property
    def tree_edges(self) -> TreeEdgeCache:
        """What the derivation trees reuse from one run to the next (a clusterer service's lifetime)."""
        from memetrace.clusterer.tree_update import TreeEdgeCache

        return TreeEdgeCache()

    @cached_property
    def matcher(self) -> Matcher:
        from memetrace.matcher.matching import MatchConfig, Matcher

        return self._loaded(Matcher(MatchConfig.from_settings(self.settings), self.index, self.features))

    def _loaded(self, component: T) -> T:
        """``component``, once the BLAS libraries it loaded run on one thread
        (:func:`memetrace.native_threads.single_threaded_blas`; undone by :meth:`close`)."""
        from memetrace.native_threads import single_threaded_blas

        self._blas_undo.append(single_threaded_blas())
        return component

    def verify_pairs(self, pairs: Sequence[tuple[int, int]], sizes: Mapping[int, tuple[int, int]]) -> list[Match]:
        """:meth:`Matcher.verify_pairs`, the verification derivation trees ask for
        (:data:`memetrace.clusterer.tree_update.PairVerifier`); the stores open on the first call, so a
        service starts without them."""
        return self.matcher.verify_pairs(pairs, sizes)

    def close(self) -> None:
        """Close what was built: the SQLite files (feature store included) and the Milvus client (a later use opens them again).
        A Milvus Lite this process serves (memetrace.lite_server) serves on until the process ends."""
        built = vars(self)  # the cached properties built so far
        built.pop("matcher", None)  # it holds the index and the feature store
        for name in ("catalog", "graph_state", "trees", "features"):
            if name in built:
                built.pop(name).close()
        for name in ("index", "occurrences", "board"):  # they hold the client closed below
            built.pop(name, None)
        if "milvus" in built:
            built.pop("milvus").close()
        while self._blas_undo:  # last limit first: each restores what it found
            self._blas_undo.pop()()
