"""clusterer.evaluate against hand-computed numbers and against the benchmark's score.py."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from memetrace.clusterer.evaluate import evaluate

SCORE_PY = Path("/work/shared/bench/score.py")

GT_ROWS = [  # path, group_id, role
    ("images/a1.jpg", "A", "original"), ("images/a2.jpg", "A", "copy"),
    ("images/a3.jpg", "A", "copy"), ("images/a4.jpg", "A", "copy"),
    ("images/b1.jpg", "B", "original"), ("images/b2.jpg", "B", "copy"),
    ("images/d1.jpg", "", "distractor"), ("images/d2.jpg", "", "distractor"),
]


def _write(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _gt(tmp_path: Path, with_role: bool = True) -> Path:
    if with_role:
        rows = [(p, g, r, "crop" if r == "copy" else "", "") for p, g, r in GT_ROWS]
        return _write(tmp_path / "gt.csv", ["path", "group_id", "role", "transform", "source"], rows)
    return _write(tmp_path / "gt.csv", ["path", "group_id"], [(p, g) for p, g, _ in GT_ROWS])


def _clusters(tmp_path: Path) -> Path:
    """Cluster 1 = {a1, a2, a3}, cluster 2 = {a4, b1, b2, d1}, d2 alone; paths spelled every way."""
    rows = [
        ("images/a1.jpg", 1), ("./images/a2.jpg", 1), ("a3.jpg", 1),        # relative, ./, bare name
        (str(tmp_path / "images" / "a4.jpg"), 2), ("images/b1.jpg", 2),     # absolute
        ("b2.jpg", 2), ("images/d1.jpg", 2),
        ("images/d2.jpg", ""),                                              # empty id: singleton
        ("elsewhere/zz.jpg", 2),                                            # not in the ground truth
    ]
    return _write(tmp_path / "clusters.csv", ["path", "cluster_id"], rows)


def test_hand_computed(tmp_path: Path) -> None:
    # Predicted sizes: c1 = 3, c2 = 4, d2 = 1 (the unknown path is not counted).
    # Group A (4): c1 shares 3 -> P 3/3 = 1, R 3/4, F1 2*.75/1.75 = 6/7 (c2 shares 1 -> F1 1/4).
    # Group B (2): c2 shares 2 -> P 2/4 = 1/2, R 1, F1 2/3.
    #   precision (1 + 1/2)/2 = .75, recall (3/4 + 1)/2 = .875, F1 (6/7 + 2/3)/2 = 16/21.
    # _all adds d1 (c2: P 1/4, R 1, F1 .4) and d2 (alone: 1, 1, 1):
    #   precision (1 + .5 + .25 + 1)/4 = .6875, recall (.75 + 1 + 1 + 1)/4 = .9375,
    #   F1 (6/7 + 2/3 + 2/5 + 1)/4 = (307/105)/4 = 307/420.
    # Query AP: a1's cluster has non-originals a2, a3, both A -> 1; b1's has a4, b2, d1, one B -> 1/3;
    #   mean 2/3.
    # Pairs: predicted C(3,2) + C(4,2) = 9; true C(4,2) + C(2,2) = 7; shared: (A,c1) 3 + (B,c2) 1 = 4.
    #   P 4/9, R 4/7, F1 (32/63)/(64/63) = .5.
    got = evaluate(_gt(tmp_path), _clusters(tmp_path))
    expected = {
        "images": 8, "groups": 2, "distractors": 2, "predicted_nonsingleton_clusters": 2,
        "unknown_paths_in_prediction": 1,
        "cluster_precision": 0.75, "cluster_recall": 0.875, "cluster_f1": 16 / 21,
        "cluster_precision_all": 0.6875, "cluster_recall_all": 0.9375, "cluster_f1_all": 307 / 420,
        "query_average_precision": 2 / 3,
        "pairwise_precision": 4 / 9, "pairwise_recall": 4 / 7, "pairwise_f1": 0.5,
        # copies (all "crop"): a2, a3 with a1 in c1, b2 with b1 in c2; a4 in c2, away from a1
        "copy_with_original_rate_per_transform": {"crop": 0.75},
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_without_role_column(tmp_path: Path) -> None:
    got = evaluate(_gt(tmp_path, with_role=False), _clusters(tmp_path))
    assert "query_average_precision" not in got and "copy_with_original_rate_per_transform" not in got
    assert got["cluster_f1"] == pytest.approx(16 / 21)


def test_distractors_with_a_group_id_are_distractors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A ground truth giving every distractor its own group id (PIMMI-style labels) scores as one
    leaving them empty, and says so: one-image groups would raise every cluster score."""
    plain = evaluate(_gt(tmp_path), _clusters(tmp_path))
    rows = [(p, g or f"solo-{p}", r, "crop" if r == "copy" else "", "") for p, g, r in GT_ROWS]
    labelled = _write(tmp_path / "labelled.csv", ["path", "group_id", "role", "transform", "source"], rows)
    with caplog.at_level("WARNING", logger="memetrace.clusterer.evaluate"):
        got = evaluate(labelled, _clusters(tmp_path))
    assert got == plain and got["groups"] == 2 and got["distractors"] == 2
    [warning] = [r.getMessage() for r in caplog.records]
    assert "2 rows with role=distractor carry a group_id" in warning


def test_transform_families(tmp_path: Path) -> None:
    rows = [("o.jpg", "A", "original", "identity"), ("c1.jpg", "A", "copy", "crop"),
            ("c2.jpg", "A", "copy", "crop"), ("c3.jpg", "A", "copy", "scale > crop"),
            ("c4.jpg", "A", "copy", "hflip > final_jpeg")]
    gt = _write(tmp_path / "gt.csv", ["path", "group_id", "role", "transform"], rows)
    pred = _write(tmp_path / "pred.csv", ["path", "cluster_id"], [("o.jpg", 1), ("c1.jpg", 1), ("c3.jpg", 1)])
    got = evaluate(gt, pred)
    assert got["copy_with_original_rate_per_transform"] == {"chain": 0.5, "crop": 0.5}


def test_eval_help_describes_both_files() -> None:
    from click.testing import CliRunner

    from memetrace.cli.main import main

    text = CliRunner().invoke(main, ["eval", "--help"]).output
    for column in ("path", "group_id", "role", "transform", "cluster_id", "distractor"):
        assert column in text


def test_perfect_and_all_singletons(tmp_path: Path) -> None:
    gt = _gt(tmp_path)
    perfect = _write(tmp_path / "perfect.csv", ["path", "cluster_id"],
                     [(p, g) for p, g, _ in GT_ROWS if g])
    got = evaluate(gt, perfect)
    assert all(got[k] == 1.0 for k in got if k.startswith(("cluster_", "pairwise_", "query_")))
    nothing = _write(tmp_path / "nothing.csv", ["path", "cluster_id"], [])
    got = evaluate(gt, nothing)
    # every group's best cluster is a singleton: P 1, R 1/4 (A) and 1/2 (B)
    assert got["cluster_precision"] == 1.0 and got["cluster_recall"] == pytest.approx(0.375)
    assert got["pairwise_precision"] == got["pairwise_recall"] == got["query_average_precision"] == 0.0


@pytest.mark.parametrize("first, precision", [("g1", 2 / 3), ("g3", 1 / 3)])
def test_tie_goes_to_first_cluster_seen(tmp_path: Path, first: str, precision: float) -> None:
    # Group G = g1..g6. X = {g1, g2, d1}: P 2/3, R 1/3; Y = {g3..g6, d2..d9}: P 4/12, R 4/6.
    # Both F1 = 2 * (2/9) / 1 = 4/9: the cluster of the group's first image in the file wins.
    members = [f"g{i}" for i in range(1, 7)]
    members.insert(0, members.pop(members.index(first)))
    gt = _write(tmp_path / "gt.csv", ["path", "group_id"],
                [(f"{m}.jpg", "G") for m in members] + [(f"d{i}.jpg", "") for i in range(1, 10)])
    x = ["g1", "g2", "d1"]
    y = ["g3", "g4", "g5", "g6"] + [f"d{i}" for i in range(2, 10)]
    pred = _write(tmp_path / "pred.csv", ["path", "cluster_id"], [(f"{m}.jpg", "X") for m in x]
                  + [(f"{m}.jpg", "Y") for m in y])
    got = evaluate(gt, pred)
    assert got["cluster_precision"] == pytest.approx(precision)
    assert got["cluster_recall"] == pytest.approx(1 - precision)
    assert got["cluster_f1"] == pytest.approx(4 / 9)


@pytest.mark.parametrize("which, column", [("gt", "group_id"), ("gt", "path"), ("clusters", "cluster_id")])
def test_missing_column(tmp_path: Path, which: str, column: str) -> None:
    gt, clusters = _gt(tmp_path), _clusters(tmp_path)
    bad = gt if which == "gt" else clusters
    with bad.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    header = [c for c in rows[0] if c != column]
    _write(bad, header, [tuple(r[c] for c in header) for r in rows])
    with pytest.raises(ValueError, match=rf"{bad.name}.*missing column '{column}'"):
        evaluate(gt, clusters)


def _random_case(tmp_path: Path, seed: int) -> tuple[Path, Path]:
    """A ground truth of groups + distractors and a noisy prediction of it (merges, splits, misses)."""
    rng = random.Random(seed)
    gt_rows, truth = [], []
    for g in range(rng.randint(3, 12)):
        for k in range(rng.randint(1, 6)):
            name = f"img_{g}_{k}.jpg"
            family = "identity" if k == 0 else rng.choice(["crop", "scale", "crop > final_jpeg"])
            gt_rows.append((f"images/{name}", f"g{g:02d}", "original" if k == 0 else "copy", family, "", ""))
            truth.append((name, g))
    for d in range(rng.randint(0, 8)):
        gt_rows.append((f"images/dist_{d}.jpg", "", "distractor", "", "", ""))
        truth.append((f"dist_{d}.jpg", None))
    rng.shuffle(gt_rows)
    gt = _write(tmp_path / f"gt{seed}.csv", ["path", "group_id", "role", "transform", "params", "source"], gt_rows)

    pred = []
    for name, g in truth:
        roll = rng.random()
        if roll < 0.1:
            continue  # missing: a singleton
        if roll < 0.15:
            cid = ""  # empty id: a singleton
        elif g is None or roll < 0.3:
            cid = str(rng.randint(100, 104))  # a shared junk cluster
        elif roll < 0.4:
            cid = str(2 * g + 1)  # split off its group
        elif roll < 0.5:
            cid = str(2 * g + 2)  # merged into the next group
        else:
            cid = str(2 * g)
        spelled = rng.choice([f"images/{name}", name, str(tmp_path / "images" / name), f"./images/{name}"])
        pred.append((spelled, rng.randint(1, 99), cid))
    pred.append(("not/in/truth.jpg", 1, "3"))
    rng.shuffle(pred)
    return gt, _write(tmp_path / f"pred{seed}.csv", ["path", "image_id", "cluster_id"], pred)


def test_agrees_with_score_py(tmp_path: Path) -> None:
    if not SCORE_PY.exists():
        pytest.skip(f"{SCORE_PY} not found")
    for seed in range(8):
        gt, pred = _random_case(tmp_path, seed)
        done = subprocess.run([sys.executable, str(SCORE_PY), str(gt), str(pred)],
                              capture_output=True, text=True, check=True, timeout=60)
        reference = json.loads(done.stdout)
        ours = evaluate(gt, pred)
        for key, value in ours.items():
            assert value == pytest.approx(reference[key], abs=1e-4), (seed, key)
