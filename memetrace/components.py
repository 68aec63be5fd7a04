"""What a stage is handed to work with: the shared components, built by the composition root.

``memetrace.cli.context.Context`` builds them lazily from settings; a test hands in-memory
stores or a session-wide embedder instead. Stages depend on this protocol, never on how it is built.
"""

from __future__ import annotations

from typing import Protocol

from memetrace.embedder import Embedder
from memetrace.feature_store import FeatureStore
from memetrace.keypoints import KeypointExtractor
from memetrace.milvus_store import MilvusStore
from memetrace.settings import Settings


class Components(Protocol):
    """Read-only attributes; an implementation may build each on first access."""

    @property
    def settings(self) -> Settings: ...

    @property
    def embedder(self) -> Embedder: ...

    @property
    def extractor(self) -> KeypointExtractor: ...

    @property
    def store(self) -> MilvusStore: ...

    @property
    def features(self) -> FeatureStore: ...
