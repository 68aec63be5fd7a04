"""The pair verification derivation trees ask for (:data:`memetrace.clusterer.tree_update.PairVerifier`):
the matcher's verifier on the stored keypoints, each pair with its geometry. Here, in the
composition root, because the clusterer may not import the matcher (tests/test_layering.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from memetrace.cli.context import Context
from memetrace.clusterer.tree_update import PairVerifier
from memetrace.feature_store import FeatureStore
from memetrace.matcher.verify import Prepared, Verifier, VerifyConfig, geometry
from memetrace.models import Match


def pair_verifier(features: FeatureStore, config: VerifyConfig) -> PairVerifier:
    verifier = Verifier(config)

    def verify(pairs: Sequence[tuple[int, int]], sizes: Mapping[int, tuple[int, int]]) -> list[Match]:
        prepared: dict[int, Prepared | None] = {}
        for i in sorted({i for pair in pairs for i in pair}):
            kp = features.get_keypoints(i)
            prepared[i] = Prepared(kp) if kp is not None else None
        others: dict[int, list[int]] = {}
        for a, b in pairs:
            if prepared[a] is not None and prepared[b] is not None:
                others.setdefault(a, []).append(b)
        found = []
        for a, bs in others.items():
            for v in verifier.verify_many(prepared[a], [prepared[b] for b in bs]):
                b = bs[v.candidate]
                geo = (geometry(v, prepared[a], prepared[b], sizes[a], sizes[b], config.coverage_radius)
                       if a in sizes and b in sizes else None)
                found.append(Match(a, b, v.inliers, v.kind, geo))
        return found

    return verify


def tree_verifier(c: Context) -> PairVerifier:
    """:func:`pair_verifier` on the context's feature store (opened on first use: a service starts
    without it) and verification settings."""
    config = VerifyConfig.from_settings(c.settings)
    return lambda pairs, sizes: pair_verifier(c.features, config)(pairs, sizes)
