"""The README cannot drift: its marked examples run, and what it says of `make test` and
`make stack` matches the Makefile and tools/local_stack.py.

A fenced block right after a ``<!-- test -->`` line is an example this test runs: a shell block
line by line with bash (``make`` lines are skipped: CI runs make itself), a ``python`` block as a
script. They run in a sandbox: the working directory and HOME are a temp folder holding
``photos/`` (part of the demo corpus), ``urls.txt``, ``some.jpg`` and ``ground_truth.csv``, with
``.venv`` linked to this checkout's, and ``MEMETRACE_DATA_DIR`` a fresh data dir there.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memetrace.cli.demo import make_demo_corpus
from tools.local_stack import METRICS_PORTS, SERVICES, banner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKED = re.compile(r"^<!-- test -->\n```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.M | re.S)
GROUPS = ("astronaut",)  # a demo-sized corpus: this group's copies and two distractors (8 files)
DISTRACTORS = 2


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block right after a ``<!-- test -->`` line."""
    return [(m["lang"], m["body"]) for m in MARKED.finditer(text)]


def shell_commands(body: str) -> list[str]:
    """The block's commands: comments and `make` lines dropped."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in body.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "make "))]


def _sandbox(tmp: Path) -> dict[str, str]:
    """The files the README's examples name, and the environment they run in."""
    corpus = make_demo_corpus(tmp / "demo")
    with (tmp / "demo" / "ground_truth.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    distractors = [r for r in rows if r["role"] == "distractor"][:DISTRACTORS]
    kept = [r for r in rows if r["group_id"] in GROUPS] + distractors
    photos = tmp / "photos"
    photos.mkdir()
    for r in kept:
        shutil.copy2(tmp / "demo" / r["path"], photos / Path(r["path"]).name)  # keeps file times: the original is oldest
    with (tmp / "ground_truth.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "path": Path(r["path"]).name} for r in kept)
    (tmp / "urls.txt").write_text(f"{corpus / distractors[0]['path'].split('/')[-1]}\n")
    shutil.copy(photos / f"{GROUPS[0]}.jpg", tmp / "some.jpg")
    (tmp / ".venv").symlink_to(Path(sys.executable).parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMETRACE_")}
    return {**env, "HOME": str(tmp), "MEMETRACE_DATA_DIR": str(tmp / "data"), "PYTHONPATH": str(ROOT)}


@pytest.mark.slow  # about a minute on 2 idle cores: each command loads the model and Milvus Lite
def test_readme_examples_run(tmp_path: Path) -> None:
    blocks = marked_blocks(README.read_text(encoding="utf-8"))
    assert [lang for lang, _ in blocks].count("") >= 1, "no <!-- test --> shell block in README.md"
    env = _sandbox(tmp_path)
    for lang, body in blocks:
        if lang == "python":
            runs = [[sys.executable, "-c", body]]
        else:
            runs = [["bash", "-euo", "pipefail", "-c", cmd] for cmd in shell_commands(body)]
        for argv in runs:
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"README example {argv[-1]!r} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    assert (tmp_path / "clusters.csv").is_file() and (tmp_path / "gallery" / "index.html").is_file()
    gallery = (tmp_path / "gallery" / "index.html").read_text(encoding="utf-8")
    assert gallery.count('<section class="card"') == 1 and '<span class="badge">earliest</span>' in gallery


def test_marked_blocks_are_found() -> None:
    text = "a\n<!-- test -->\n```\nx --y  # why\nmake demo\n\n```\n```\nnot marked\n```\n<!-- test -->\n```python\nprint(1)\n```\n"
    blocks = marked_blocks(text)
    assert blocks == [("", "x --y  # why\nmake demo\n\n"), ("python", "print(1)\n")]
    assert shell_commands(blocks[0][1]) == ["x --y"]


def test_readme_names_every_package_make_test_installs() -> None:
    """`make test` runs system-deps: the README's first lines name each Debian package it installs."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    packages = re.search(r"apt-get install -y -qq ([\w .+-]+?); fi", makefile)[1].split()
    assert {"libmagic1", "prometheus"} <= set(packages)
    test_line = next(line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("make test"))
    assert all(p in test_line for p in packages), (packages, test_line)


def test_stack_banner_lists_every_service_and_metrics_port() -> None:
    text = banner("127.0.0.1:9092", "http://127.0.0.1:19530", 8000, Path("/data/logs"))
    assert "127.0.0.1:9092" in text and "http://127.0.0.1:19530" in text and "/data/logs" in text
    for name in SERVICES:
        assert f"memetrace {name}" in text
    for port in METRICS_PORTS.values():
        assert f"http://127.0.0.1:{port}/metrics" in text
    assert "http://127.0.0.1:8000/metrics" in text and "http://127.0.0.1:8000/docs" in text
    assert "metrics ports" in README.read_text(encoding="utf-8")  # the README says it prints them


@pytest.mark.parametrize("lang", ["", "python"])
def test_runnable_blocks_are_marked(lang: str) -> None:
    """The README's folder example and Python example are marked to run (the API one needs a server)."""
    marked = [body for block_lang, body in marked_blocks(README.read_text(encoding="utf-8")) if block_lang == lang]
    if lang == "python" and "```python" not in README.read_text(encoding="utf-8"):
        pytest.skip("the README has no Python example yet")
    assert marked, f"no marked {lang or 'shell'} block"
    if lang == "":
        assert any("memetrace index" in b for b in marked)
