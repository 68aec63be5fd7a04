"""What a stage is handed to work with: the shared components, built by the composition root.

``memetrace.cli.context.Context`` builds them lazily from settings; a test hands in-memory
stores (``MemoryVectorIndex``, ``MemoryOccurrenceLog``, ``MemoryClusterBoard``, ``MemoryFeatureStore``) or a
session-wide embedder instead. Stages depend on this protocol, never on how it is built.
"""

from __future__ import annotations

from typing import Protocol

from memetrace.cluster_board import ClusterBoard
from memetrace.embedder import Embedder
from memetrace.feature_store import FeatureStore
from memetrace.keypoints import KeypointExtractor
from memetrace.occurrence_log import OccurrenceLog
from memetrace.settings import Settings
from memetrace.tree_store import TreeStore
from memetrace.vector_index import VectorIndex


class Components(Protocol):
    """Read-only attributes; an implementation may build each on first access."""

    @property
    def settings(self) -> Settings: ...

    @property
    def embedder(self) -> Embedder: ...

    @property
    def extractor(self) -> KeypointExtractor: ...

    @property
    def index(self) -> VectorIndex: ...

    @property
    def occurrences(self) -> OccurrenceLog: ...

    @property
    def board(self) -> ClusterBoard: ...

    @property
    def features(self) -> FeatureStore: ...

    @property
    def trees(self) -> TreeStore: ...
