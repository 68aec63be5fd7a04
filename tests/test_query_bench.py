"""benchmarks.query's scoring: family of a chain, mAP / µAP / wrong-first from ranked answers."""

from __future__ import annotations

import pytest

from benchmarks.query import _score, family, micro_ap


def test_the_family_is_the_last_edit_of_the_chain() -> None:
    assert family("crop>text>collage") == "collage" and family("scale") == "scale"


def test_micro_ap_pools_every_answer_by_score() -> None:
    # scores 50 (hit), 40 (wrong), 30 (hit), one query not found: precision 1 at 50, 2/3 at 30
    assert micro_ap([(30, True), (50, True), (40, False)], positives=3) == pytest.approx((1 + 2 / 3) / 3)
    assert micro_ap([(10, False)], positives=2) == 0.0 and micro_ap([], positives=0) == 0.0


def test_score_counts_hits_ranks_and_wrong_firsts() -> None:
    queries = [{"rank": 1, "wrong_first": False, "answers": [(60, True)]},
               {"rank": 2, "wrong_first": True, "answers": [(40, False), (20, True)]},
               {"rank": None, "wrong_first": True, "answers": [(15, False)]},
               {"rank": None, "wrong_first": False, "answers": []}]
    s = _score(queries)
    assert (s["queries"], s["found"], s["hit_rate"], s["wrong_first"]) == (4, 2, 0.5, 2)
    assert s["mAP"] == pytest.approx((1 + 0.5) / 4, abs=1e-4)
    assert s["uAP"] == pytest.approx((1 + 2 / 3) / 4, abs=1e-4)  # 60 hit, 40 miss, 20 hit, 15 miss
