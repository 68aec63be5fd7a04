"""Every setting that changes which copies are found is in the README's matching table, with the
description the code gives it (which way to turn it)."""

from __future__ import annotations

import re
from pathlib import Path

from memetrace.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
# the settings that change what is matched (what is decoded, embedded, kept as keypoints, verified)
MATCHING = ("decode_max_side", "regions", "store_grid_regions", "box_image_size", "sift_features", "sift_max_side", "sift_flat_max",
            "sift_smooth_points", "keypoint_coding", "vector_dims",
            "candidates_k", "query_candidates_k", "candidate_min_similarity", "ratio_test", "min_inliers", "ransac_reproj_px",
            "min_coverage", "same_frame_min_coverage", "overlay_min_coverage", "overlay_min_agreement", "coverage_radius", "low_texture_points",
            "low_texture_min_similarity", "low_texture_min_agreement")


def row(name: str) -> str:
    field = Settings.model_fields[name]
    return f"| `MEMETRACE_{name.upper()}` | {field.default} | {field.description} |"


def test_the_readme_table_lists_every_matching_setting_as_the_code_describes_it() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [row(n) for n in MATCHING if row(n) not in text]
    assert not missing, "README.md's matching settings table lacks or differs on:\n" + "\n".join(missing)
    described = re.findall(r"^\| `MEMETRACE_(\w+)` \|", text, re.M)
    assert sorted(described) == sorted(n.upper() for n in MATCHING)
