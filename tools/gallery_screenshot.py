"""The README's gallery picture: ``make gallery-screenshot`` (after ``make demo``).

Serves DATA_DIR with ``memetrace serve`` on a free loopback port, waits until it is ready, and
screenshots ``/gallery`` in headless Chromium (:mod:`tests.browser`), failing on any console error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.services import free_port, stop_process
from tests.browser import find_browser, render

MEMETRACE = str(Path(sys.executable).with_name("memetrace"))


def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"memetrace serve exited with {proc.returncode}; is the data dir indexed (make demo)?")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"memetrace serve not ready at {base} after {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("memetrace-data/demo"))
    parser.add_argument("--out", type=Path, default=Path("docs/gallery.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args()
    if find_browser() is None:
        sys.exit("no headless browser: `make system-deps` installs Debian's chromium-headless-shell")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([MEMETRACE, "--data-dir", str(args.data_dir), "serve", "--port", str(port)])
    try:
        _wait_ready(base, proc, 180)
        page = render(f"{base}/gallery", png=args.out, width=args.width, height=args.height)
    finally:
        stop_process(proc, grace=10)
    if page.console:
        sys.exit(f"the gallery logged: {page.console}")
    cards = page.dom.count('class="card"')
    print(f"{args.out}: {args.out.stat().st_size} bytes, {cards} clusters")


if __name__ == "__main__":
    main()
