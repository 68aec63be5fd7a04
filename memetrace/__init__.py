"""memetrace: follow images as they are reused across social networks.

This package holds only what every stage shares: settings, record schemas, image decoding,
the embedder, keypoints, the store interfaces (vector index, occurrence log, cluster board) and their
Milvus backends, the feature store, the SQLite file format check.
The stages themselves live in the top-level packages ``ingest``, ``matcher`` and ``clusterer``.
"""

__version__ = "0.1.0"
