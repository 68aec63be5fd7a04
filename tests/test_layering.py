"""The layering rules of the code base, checked on the source (docs/DESIGN.md draws them):

- ``memetrace/`` (the shared package) imports no stage and not the composition root;
- a stage imports no other stage's internals except through the shared package, and never the
  composition root (``memetrace.cli``), which builds them all;
- nothing imports the repository folders by their bare names (``ingest``, ``api``...): installed,
  they exist only as ``memetrace.ingest``, ``memetrace.api``...
- the distribution installs one top-level import name, ``memetrace``.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = {"ingest", "matcher", "clusterer", "api"}
FOLDERS = STAGES | {"cli"}
# which stage may use which: the API serves what the matcher finds (matcher.query), the batch and
# streaming wiring lives in cli; nothing else crosses
ALLOWED = {"api": {"matcher"}, "ingest": set(), "matcher": set(), "clusterer": set()}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from memetrace import ingest` imports the stage too: count module.name for each name
            names.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
    return names


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "memetrace" and len(parts) > 1 and parts[1] in FOLDERS else None


@pytest.mark.parametrize("path", python_files("memetrace"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_shared_package_imports_no_stage(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if layer_of(m))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: memetrace/ must hold only what the stages share"


@pytest.mark.parametrize("path", python_files(*sorted(STAGES)), ids=lambda p: str(p.relative_to(REPO)))
def test_a_stage_imports_no_other_stage_nor_the_composition_root(path: Path) -> None:
    own = path.relative_to(REPO).parts[0]
    bad = sorted(m for m in imported_modules(path)
                 if (layer := layer_of(m)) and layer != own and layer not in ALLOWED[own])
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", python_files("memetrace", *sorted(FOLDERS), "tests", "benchmarks", "tools"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_folder_by_its_bare_name(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in FOLDERS)
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: use memetrace.{bad[0]}"


def test_the_distribution_installs_one_top_level_name() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {p.split(".")[0] for p in config["packages"]} == {"memetrace"}
    mapped = config["package-dir"]
    assert {mapped[f"memetrace.{f}"] for f in FOLDERS} == FOLDERS  # the folders users expect stay
    assert all(f"memetrace.{f}" in config["packages"] for f in FOLDERS)
