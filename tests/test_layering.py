"""The layering rules of the code base, checked on the source (docs/DESIGN.md draws them):

- ``memetrace/`` (the shared package) imports no stage and not the composition root, with one
  exception: the Python API's entry point ``memetrace.open`` (and its types) import
  ``memetrace.cli.library`` inside functions of ``memetrace/__init__.py``, never at import time;
- a stage imports no other stage's internals except through the shared package, and never the
  composition root (``memetrace.cli``), which builds them all;
- nothing imports the repository folders by their bare names (``ingest``, ``api``...): installed,
  they exist only as ``memetrace.ingest``, ``memetrace.api``...
- the distribution installs one top-level import name, ``memetrace``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = {"ingest", "matcher", "clusterer", "api"}
FOLDERS = STAGES | {"cli"}
# which stage may use which: the API serves what the matcher finds (matcher.query), the batch and
# streaming wiring lives in cli; nothing else crosses
ALLOWED = {"api": {"matcher"}, "ingest": set(), "matcher": set(), "clusterer": set()}
# the one module memetrace/ may reach up to, from one file and only inside a function (a lazy entry
# point: `memetrace.open(data_dir)` in a notebook, while `import memetrace` loads no stage)
LAZY_ENTRY_POINT = ("memetrace/__init__.py", "memetrace.cli.library")


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """What ``path`` imports; ``top_level_only``: only the imports run when it is imported (not
    those inside functions or under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in (_outside_functions(tree) if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from memetrace import ingest` imports the stage too: count module.name for each name
            names.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
    return names


def _outside_functions(node: ast.AST) -> list[ast.AST]:
    found = [node]
    for child in ast.iter_child_nodes(node):
        type_checking = isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING")
        if not (type_checking or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            found += _outside_functions(child)
    return found


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "memetrace" and len(parts) > 1 and parts[1] in FOLDERS else None


@pytest.mark.parametrize("path", python_files("memetrace"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_shared_package_imports_no_stage(path: Path) -> None:
    lazy = LAZY_ENTRY_POINT[1] if str(path.relative_to(REPO)) == LAZY_ENTRY_POINT[0] else None

    def is_lazy(m: str) -> bool:  # the module or a name imported from it
        return lazy is not None and (m == lazy or m.startswith(lazy + "."))

    bad = sorted(m for m in imported_modules(path) if layer_of(m) and not is_lazy(m))
    bad += sorted(m for m in imported_modules(path, top_level_only=True) if is_lazy(m))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: memetrace/ must hold only what the stages share"


def test_import_memetrace_loads_no_stage_and_no_heavy_library() -> None:
    """The lazy entry point stays lazy: `import memetrace` alone loads no stage, torch nor numpy."""
    code = ("import sys, memetrace; assert callable(memetrace.open); "
            "print(sorted(m for m in sys.modules if m.startswith('memetrace.') or m in ('torch', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


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
