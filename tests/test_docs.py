"""The docs stay true to the code: the README is short and links only inside the repository,
every link resolves, the design map names every module, and the settings page is the one
generated from the Settings model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_FOLDERS = ("memetrace", "ingest", "matcher", "clusterer", "api", "cli")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_short_and_opens_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 16 * 1024, "README.md is over 16 KB: move the long parts into docs/"
    opening = "\n".join(text.splitlines()[:40])
    assert "make demo" in opening and "make test" in opening


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_in_the_repository_and_resolve(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"{doc.name} links {target}, outside the repository"
        assert path.exists(), f"{doc.name} links {target}, which does not exist"


def test_the_design_map_names_every_module() -> None:
    design = (REPO / "docs" / "DESIGN.md").read_text()
    modules = [p.relative_to(REPO).as_posix() for f in CODE_FOLDERS for p in sorted((REPO / f).glob("*.py"))
               if p.name != "__init__.py"]
    missing = [m for m in modules if f"`{m}`" not in design]
    assert not missing, f"docs/DESIGN.md does not describe {missing}"
    named = set(re.findall(r"`((?:memetrace|ingest|matcher|clusterer|api|cli)/\w+\.py)`", design))
    gone = sorted(n for n in named if not (REPO / n).exists())
    assert not gone, f"docs/DESIGN.md describes modules that no longer exist: {gone}"


def test_the_settings_page_is_generated_from_the_code() -> None:
    run = subprocess.run([sys.executable, "-m", "tools.settings_doc", "--check"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
