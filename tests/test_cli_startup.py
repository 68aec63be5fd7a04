"""``--help``, ``eval``, ``stats`` and ``export`` start fast (issue 15, item 7): they import no
model (torch, timm) and, but for ``stats``/``export`` on stores, no OpenCV. Checked by what a fresh
interpreter has imported after the verb ran, not by timing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "cv2")

RUN_VERB = textwrap.dedent("""
    import json, sys
    from memetrace.cli.main import main
    try:
        main(sys.argv[1:], standalone_mode=False)
    except SystemExit:
        pass
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})), file=sys.stderr)
""").format(heavy=set(HEAVY))


def heavy_modules_after(tmp_path: Path, *args: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEMETRACE_")}
    done = subprocess.run([sys.executable, "-c", RUN_VERB, "--data-dir", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    return {m.split(".")[0] for m in json.loads(done.stderr.strip().splitlines()[-1])}


@pytest.fixture()
def eval_files(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "gt.csv").write_text("path,group_id\na.jpg,A\nb.jpg,A\n")
    (tmp_path / "clusters.csv").write_text("path,cluster_id\na.jpg,1\nb.jpg,1\n")
    return str(tmp_path / "gt.csv"), str(tmp_path / "clusters.csv")


@pytest.mark.parametrize("verb", [["--help"], ["eval", "--help"], ["export", "--help"], ["eval"]])
def test_help_and_eval_import_no_model_and_no_opencv(tmp_path: Path, verb: list[str],
                                                     eval_files: tuple[str, str]) -> None:
    args = [*verb, *eval_files] if verb == ["eval"] else verb
    assert heavy_modules_after(tmp_path, *args) == set()


@pytest.mark.parametrize("verb", [["stats"], ["export"]])
def test_stats_and_export_import_no_model(tmp_path: Path, verb: list[str]) -> None:
    assert not heavy_modules_after(tmp_path, *verb) & {"torch", "timm"}


def test_prune_remove_and_reset_import_no_model() -> None:
    """Their module, cli/batch.py, loads the model and the matcher only when `index` runs."""
    code = "import sys, memetrace.cli.batch; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
