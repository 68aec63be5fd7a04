"""Configuration mistakes end in one line naming the setting or address and the fix (issue 15,
item 3), run as a user would: ``memetrace`` in a subprocess, stderr read line by line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.services import free_port

MEMETRACE = str(Path(sys.executable).with_name("memetrace"))


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEMETRACE_")}
    return subprocess.run([MEMETRACE, *args], env={**clean, "MEMETRACE_DATA_DIR": str(tmp_path / "data"), **env},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def lines(done: subprocess.CompletedProcess) -> list[str]:
    return done.stderr.strip().splitlines()


def test_each_bad_setting_is_one_line_with_its_name_value_and_what_is_allowed(tmp_path: Path) -> None:
    done = run(tmp_path, "stats", MEMETRACE_DEVICE="gpu", MEMETRACE_MIN_INLIERS="abc")
    assert done.returncode == 1
    device, inliers = lines(done)
    assert "MEMETRACE_DEVICE='gpu'" in device and "'auto', 'cpu' or 'cuda'" in device
    assert "MEMETRACE_MIN_INLIERS='abc'" in inliers and "integer" in inliers
    assert "Traceback" not in done.stderr


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    done = run(tmp_path, "-v", "stats", MEMETRACE_DEVICE="gpu")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_a_dead_milvus_uri_is_one_line_within_seconds(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = run(tmp_path, "stats", MEMETRACE_MILVUS_URI=uri)
    elapsed = time.monotonic() - start
    assert done.returncode == 1
    [line] = lines(done)
    assert uri in line and "fix MEMETRACE_MILVUS_URI" in line
    assert elapsed < 30  # a bound against hanging, not a speed target: the retries stop after 3 s


def test_a_busy_port_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run(tmp_path, "serve", "--port", str(port))
    assert done.returncode == 1
    [line] = lines(done)
    assert f"127.0.0.1:{port}" in line and "use --port" in line


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_an_unknown_setting_is_warned_with_the_closest_name(tmp_path: Path, where: str) -> None:
    if where == ".env":
        (tmp_path / ".env").write_text("MEMETRACE_MIN_INLIERZ=3\n")
    done = run(tmp_path, "stats", **({"MEMETRACE_MIN_INLIERZ": "3"} if where == "environment" else {}))
    assert done.returncode == 0, done.stderr
    [line] = lines(done)
    assert "MEMETRACE_MIN_INLIERZ" in line and "did you mean MEMETRACE_MIN_INLIERS" in line
