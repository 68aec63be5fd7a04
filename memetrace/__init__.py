"""memetrace: follow images as they are reused across social networks.

This package holds only what every stage shares: settings, the message contracts and domain
types, the store interfaces (vector index, occurrence log, cluster board, feature store) and their
backends, image decoding, the embedder, keypoints and the consume loop. The stages live in the
repository folders ``ingest/``, ``matcher/``, ``clusterer/`` and ``api/``, installed as
``memetrace.ingest`` ...; ``cli/`` (``memetrace.cli``) wires them together. docs/DESIGN.md is the map.
"""

__version__ = "0.1.0"
