"""The quality gate: the whole pipeline on the benchmark's dev split meets the required figures.

Slow (about 2-4 minutes on 2 cores): generates the split with the benchmark's make_bench.py, runs
index -> match -> cluster on a fresh data dir, scores with the benchmark's score.py. Everything
goes through benchmarks.run, the code behind ``make bench``. Skipped when the benchmark folder
(``$MEMETRACE_BENCH_DIR`` or ``<repo>/../shared/bench``) or AugLy (the generator) is missing.
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

from benchmarks.run import (  # noqa: E402
    QUALITY_FLOOR,
    TRANSFORM_FLOOR,
    bench_unavailable,
    format_report,
    run_bench,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = bench_unavailable()
    if reason:
        pytest.skip(reason)
    root: Path = tmp_path_factory.mktemp("bench")
    res = run_bench("dev", out=root / "out", cache=root / "cache", query=False)  # query bench: make bench
    print("\n" + format_report(res))
    print("\nscore.py:\n" + json.dumps(res["score"], indent=1))
    return res


def test_every_image_is_indexed(result: dict[str, Any]) -> None:
    summary, score = result["summary"], result["score"]
    assert summary["bad_files"] == 0 and summary["new_images"] == score["images"]
    assert score["unknown_paths_in_prediction"] == 0


def test_cluster_f1_and_precision_meet_the_floor(result: dict[str, Any]) -> None:
    score = result["score"]
    assert score["cluster_f1"] >= QUALITY_FLOOR["cluster_f1"], score
    assert score["cluster_precision"] >= QUALITY_FLOOR["cluster_precision"], score


def test_every_transform_family_is_clustered_with_its_original(result: dict[str, Any]) -> None:
    rates = result["score"]["copy_with_original_rate_per_transform"]
    assert rates, "score.py reported no transform families"
    low = {family: rate for family, rate in rates.items() if rate < TRANSFORM_FLOOR}
    assert not low, f"copy-with-original rate below {TRANSFORM_FLOOR}: {low}"


def test_project_evaluator_agrees_with_score_py(result: dict[str, Any]) -> None:
    assert result["evaluate_cross_check"]["agrees"], result["evaluate_cross_check"]["mismatches"]
