"""Headless Chromium for tests: load a URL or an HTML string, get the DOM after scripts ran, the
console messages and JS errors, and optionally a PNG screenshot.

The browser is Debian's ``chromium-headless-shell`` (``make system-deps`` installs it, about 30 s);
:func:`require_browser` skips a test with the reason when it is missing. Each call starts a fresh
browser (about 0.5 s), so pages never share state::

    from tests.browser import render, require_browser

    def test_page(tmp_path):
        require_browser()
        page = render("http://127.0.0.1:8000/gallery", png=tmp_path / "shot.png")
        assert not page.errors, page.errors
        assert 'class="card"' in page.dom
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
# Chromium logs every console message (console.*, uncaught exceptions, CSP refusals) at INFO as
#   [1201/230929.769150:INFO:CONSOLE:1] "Uncaught ReferenceError: x is not defined", source: URL (1)
CONSOLE = re.compile(r':CONSOLE(?::\d+)?\] "(?P<text>.*)", source: (?P<source>.*)$')
ERROR_MARKS = ("Uncaught", "Content Security Policy", "Failed to load")


@dataclass(frozen=True)
class Rendered:
    """What a page showed: ``dom`` (serialized after scripts ran), every console line (Chromium
    does not log their level: a strict test asserts ``console == []``), and those that are errors
    for sure (uncaught exceptions, CSP refusals)."""

    dom: str
    console: list[str]
    errors: list[str]
    png: Path | None


def find_browser() -> str | None:
    """The headless browser's executable, or None."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def require_browser() -> str:
    """The browser's path; skips the calling test when there is none."""
    path = find_browser()
    if path is None:
        pytest.skip("no headless browser: `make system-deps` installs Debian's chromium-headless-shell")
    return path


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [require_browser(), "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *args]
        # no D-Bus here: keep its noise out; HOME for the profile's helpers
        env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:", "HOME": profile}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)


def _console(stderr: str) -> list[str]:
    return [f"{m['text']} ({m['source']})" for line in stderr.splitlines() if (m := CONSOLE.search(line))]


def render(target: str, png: Path | None = None, width: int = 1280, height: int = 900,
           wait_ms: int = 3000, timeout_s: float = 60) -> Rendered:
    """Load ``target`` (a URL, or an HTML document when it starts with ``<``) and let its scripts
    and loads run for up to ``wait_ms`` of virtual time; with ``png``, also screenshot the
    ``width`` x ``height`` viewport there."""
    with tempfile.TemporaryDirectory(prefix="page-") as tmp:
        if target.lstrip().startswith("<"):
            page = Path(tmp) / "page.html"
            page.write_text(target, encoding="utf-8")
            target = page.as_uri()
        common = [f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}"]
        dumped = _run([*common, "--dump-dom", target], timeout_s)
        if dumped.returncode != 0 or not dumped.stdout:
            raise RuntimeError(f"{BROWSERS[0]} could not load {target}: {dumped.stderr[-2000:]}")
        console = _console(dumped.stderr)
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
            shot = _run([*common, f"--screenshot={png}", target], timeout_s)
            if shot.returncode != 0 or not png.exists():
                raise RuntimeError(f"screenshot of {target} failed: {shot.stderr[-2000:]}")
    return Rendered(dumped.stdout, console, [c for c in console if any(m in c for m in ERROR_MARKS)], png)
