"""The propagation gate: derivation trees on the benchmark's propagation set (make_propagation.py,
dev split) hold the floor of benchmarks.propagation, and its clusters score as well as required.

Slow (a few minutes on 2 cores): generates the set, runs ``index --posts``, match, cluster, trees
on a fresh data dir, scores with score_propagation.py and score.py, all through
benchmarks.propagation (``make bench-propagation``). Skipped without the benchmark folder or AugLy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `benchmarks` is not an installed package: plain `pytest` finds it too
    sys.path.insert(0, str(_REPO))

from benchmarks.propagation import CLUSTER_FLOOR, FLOOR, run_bench  # noqa: E402
from benchmarks.run import bench_unavailable  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = bench_unavailable()
    if reason:
        pytest.skip(reason)
    root: Path = tmp_path_factory.mktemp("propagation")
    res = run_bench("dev", out=root / "out", cache=root / "cache")
    print("\n" + json.dumps(res["trees"], indent=1))
    return res


@pytest.mark.parametrize("figure", sorted(FLOOR))
def test_trees_hold_the_floor(result: dict[str, Any], figure: str) -> None:
    assert result["trees"][figure] >= FLOOR[figure], json.dumps(result["trees"], indent=1)


@pytest.mark.parametrize("figure", sorted(CLUSTER_FLOOR))
def test_clusters_of_the_set(result: dict[str, Any], figure: str) -> None:
    assert result["clusters"][figure] >= CLUSTER_FLOOR[figure], json.dumps(result["clusters"], indent=1)


def test_every_post_of_the_set_is_recorded(result: dict[str, Any]) -> None:
    posts = result["pipeline"]["posts"]
    assert posts["recorded"] == posts["rows"] and posts["unknown_files"] == 0 and posts["bad_rows"] == 0
