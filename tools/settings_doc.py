"""Writes docs/settings.md from the Settings model, so the table cannot drift from the code.

    .venv/bin/python -m tools.settings_doc          # rewrite docs/settings.md
    .venv/bin/python -m tools.settings_doc --check  # exit 1 if it is out of date (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

from memetrace.settings import PREFIX, RENAMED, Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"

HEADER = """# Settings

Every setting is a `MEMETRACE_*` environment variable (or a line of a `.env` file in the working
directory), read once by `memetrace/settings.py`; each component builds its own small config from
it. A `MEMETRACE_*` name that is no setting is warned about with the closest known one. This page
is generated from the code (`python -m tools.settings_doc`; a test fails when it is stale).

| variable | default | meaning |
| --- | --- | --- |
"""


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None or value == "":
        return "(empty)"
    return f"`{value}`"


def render() -> str:
    rows = [f"| `{PREFIX}{name.upper()}` | {_default(f)} | {(f.description or '').replace('|', '/')} |"
            for name, f in Settings.model_fields.items()]
    renamed = "\n".join(f"- `{PREFIX}{old.upper()}`: now {', '.join(f'`{PREFIX}{n.upper()}`' for n in new)}"
                        for old, new in RENAMED.items())
    return (HEADER + "\n".join(rows) + "\n\nRenamed settings, still accepted with a warning until 0.3:\n\n"
            + renamed + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/settings.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if DOC.read_text() != text:
            print(f"{DOC} is out of date: run .venv/bin/python -m tools.settings_doc", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
