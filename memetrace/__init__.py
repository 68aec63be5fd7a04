"""memetrace: follow images as they are reused across social networks.

This package holds only what every stage shares: settings, record schemas, image decoding,
the embedder, keypoints, the Milvus store, the feature store, the catalog and the CLI.
The stages themselves live in the top-level packages ``ingest``, ``matcher`` and ``clusterer``.
"""

__version__ = "0.1.0"
