"""The query API under hostile uploads (issue 10): ``memetrace serve`` in a process of its own on
127.0.0.1, waves of 50 concurrent uploads of one hostile kind at a time, while a probe process
measures ``/healthz`` and the server's peak resident memory (VmHWM, reset before each kind) is read
from ``/proc``.

Kinds: a progressive JPEG whose last scan repeats to 1,000 scans (~270 KB, 36 MP), a 60-megapixel
PNG of one colour (~190 KB), and bodies that stop half-way. The server runs with the shipped
defaults; what it must hold to: ``/healthz`` p99 under 1 s, peak RSS (VmHWM) under the memory
limit of ``deploy/k8s/base/serve.yaml``, every upload answered (a result, a refusal, or 503 busy),
and every stalled body cut with a 408.
"""

from __future__ import annotations

import io
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from PIL import Image

from memetrace.api.schemas import ErrorBody, SearchResponse
from tests.conftest import load_photo

pytestmark = pytest.mark.slow  # ~1 min: in make test, not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
SERVE_MANIFEST = ROOT / "deploy" / "k8s" / "base" / "serve.yaml"
CONCURRENT = 50
HEALTHZ_P99_S = 1.0
PROBE_EVERY_S = 0.05
MIN_STORM_S = 5.0  # waves of uploads go on at least this long: enough probes for a p99
MIN_PROBES = 50
BODY_TIMEOUT_S = 15.0  # the default of MEMETRACE_API_BODY_TIMEOUT_S, which this server runs with
# The probe runs in a process of its own: in this one it would wait for the GIL behind the 50 upload threads.
PROBE = """
import json, sys, threading, time, urllib.request
url, every = sys.argv[1], float(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies, failures = [], []
while not stop.is_set():
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            resp.read()
    except Exception as exc:  # an HTTP error status or no answer: both are failures of /healthz
        failures.append(repr(exc))
    latencies.append(time.monotonic() - started)
    if len(latencies) == 1:
        print("probing", flush=True)
    stop.wait(every)
print(json.dumps({"latencies": latencies, "failures": failures}), flush=True)
"""
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def k8s_memory_limit() -> int:
    """The serve container's memory limit in bytes, as deploy/k8s/base/serve.yaml ships it."""
    (deployment,) = [d for d in yaml.safe_load_all(SERVE_MANIFEST.read_text()) if d and d["kind"] == "Deployment"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "serve"]
    quantity = str(container["resources"]["limits"]["memory"])
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if quantity.endswith(u)), "")
    return int(float(quantity.removesuffix(unit)) * _UNITS.get(unit, 1))


# ------------------------------------------------------------------------------------ hostile inputs


def _sos_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan of a JPEG PIL wrote: the SOS header and its entropy-coded data."""
    pos, scans = 2, []
    while data[pos + 1] != 0xD9:
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if data[pos + 1] == 0xDA:
            while data[end] != 0xFF or data[end + 1] == 0x00 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            scans.append((pos, end))
        pos = end
    return scans


def progressive_jpeg(side: int = 6000, scans: int = 1000) -> bytes:
    """A progressive JPEG of one colour whose last scan (a refinement of every block) is repeated:
    libjpeg decodes each copy over the whole image, few bytes buy seconds of CPU."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (128, 120, 110)).save(buf, "JPEG", quality=75, progressive=True)
    data = buf.getvalue()
    start, end = _sos_segments(data)[-1]
    repeats = scans - len(_sos_segments(data))
    return data[:end] + data[start:end] * repeats + data[end:]


def huge_png(pixels: int = 59_980_000) -> bytes:
    """One colour, just under the default MEMETRACE_MAX_PIXELS of 60 M: deflate shrinks it ~1000x."""
    side = int(pixels ** 0.5)
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 200)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------------------------------- server


@dataclass
class Server:
    proc: subprocess.Popen
    base: str

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM (bytes) of the server process."""
        lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines)
                if k in ("VmRSS", "VmHWM")}

    def reset_peak(self) -> None:
        """Start VmHWM again from the current RSS (Linux: 5 > /proc/PID/clear_refs)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``memetrace index`` of two photos, then ``memetrace serve`` on a free port, defaults otherwise."""
    tmp = tmp_path_factory.mktemp("hostile")
    folder = tmp / "images"
    folder.mkdir()
    for name in ("astronaut", "cat"):
        load_photo(name).save(folder / f"{name}.jpg", quality=90)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEMETRACE_")}
    env.update(MEMETRACE_DATA_DIR=str(tmp / "data"), MEMETRACE_DEVICE="cpu")
    cli = [str(Path(sys.executable).with_name("memetrace"))]
    subprocess.run([*cli, "index", str(folder)], env=env, cwd=tmp, check=True, capture_output=True, timeout=300)
    port = _free_port()
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen([*cli, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            try:
                if _get(server.base + "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the API did not become ready in 180 s"
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ------------------------------------------------------------------------------------------ storm


@dataclass
class Outcome:
    status: int  # 0: no HTTP answer
    body: bytes
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    closed: bool = True  # the server closed the connection after answering


def _read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """The status, headers and body of one HTTP/1.1 answer on ``sock``, and whether the server then closed it."""
    f = sock.makefile("rb")
    status = int(f.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline().strip()):
        key, value = line.decode().split(":", 1)
        headers[key.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", 0)))
    closed = f.read(1) == b""
    return status, headers, body, closed


def upload(base_port: int, data: bytes, stop_after: int | None = None) -> Outcome:
    """POST data as the multipart field ``image``; ``stop_after``: send that many body bytes, then stall."""
    body, content_type = multipart(data)
    close = "Connection: close\r\n" if stop_after is None else ""  # a stalled one: the server must close it
    head = (f"POST /v1/search HTTP/1.1\r\nHost: api\r\nContent-Type: {content_type}\r\n{close}"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", base_port), timeout=300) as sock:
            sock.sendall(head + (body if stop_after is None else body[:stop_after]))
            status, headers, reply, closed = _read_reply(sock)
    except OSError as exc:
        return Outcome(0, repr(exc).encode(), time.monotonic() - started)
    return Outcome(status, reply, time.monotonic() - started, headers, closed)


@dataclass
class Storm:
    outcomes: list[Outcome]
    healthz_s: list[float]
    healthz_failures: list[str]
    peak_rss: int

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.healthz_s, n=100, method="inclusive")[98]


def storm(server: Server, one_upload: Callable[[], Outcome]) -> Storm:
    """Waves of CONCURRENT uploads at once, for at least MIN_STORM_S; /healthz probed every
    PROBE_EVERY_S (a new connection each time) until the last upload is answered."""
    server.reset_peak()
    probe = subprocess.Popen([sys.executable, "-c", PROBE, server.base + "/healthz", str(PROBE_EVERY_S)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert probe.stdout is not None and probe.stdout.readline() == b"probing\n"
        outcomes: list[Outcome] = []
        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            while not outcomes or time.monotonic() - started < MIN_STORM_S:
                outcomes += pool.map(lambda _: one_upload(), range(CONCURRENT))
    finally:
        out, _ = probe.communicate(b"", timeout=60)
    probed = json.loads(out)
    return Storm(outcomes, probed["latencies"], probed["failures"], server.status()["VmHWM"])


def _report(kind: str, result: Storm, limit: int) -> None:
    statuses: dict[int, int] = {}
    for o in result.outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    print(json.dumps({"kind": kind, "uploads": len(result.outcomes), "healthz_p99_s": round(result.p99, 3),
                      "healthz_max_s": round(max(result.healthz_s), 3),
                      "healthz_probes": len(result.healthz_s), "peak_rss_mib": result.peak_rss >> 20,
                      "limit_mib": limit >> 20, "statuses": statuses,
                      "slowest_upload_s": round(max(o.seconds for o in result.outcomes), 1)}))


def _assert_responsive(kind: str, result: Storm) -> None:
    limit = k8s_memory_limit()
    _report(kind, result, limit)
    assert not result.healthz_failures, result.healthz_failures[:5]
    assert len(result.healthz_s) >= MIN_PROBES, "too few probes for a p99"
    assert result.p99 < HEALTHZ_P99_S, f"/healthz p99 {result.p99:.2f} s under {kind} uploads"
    assert result.peak_rss < limit, f"peak RSS {result.peak_rss >> 20} MiB over the k8s limit {limit >> 20} MiB"


def _assert_answered(outcomes: list[Outcome], refusals: set[str], searchable: bool) -> None:
    """Each upload got a result (when ``searchable``), a refusal from ``refusals``, or 503 busy with Retry-After."""
    for o in outcomes:
        assert o.status in ((200, 422, 503) if searchable else (422, 503)), (o.status, o.body[:300])
        if o.status == 200:
            SearchResponse.model_validate_json(o.body)
            continue
        error = ErrorBody.model_validate_json(o.body)
        if o.status == 503:
            assert error.error == "busy" and int(o.headers["retry-after"]) > 0, error
        else:
            assert error.error in refusals, error


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    data = progressive_jpeg()
    assert len(_sos_segments(data)) == 1000 and 200_000 < len(data) < 300_000
    return data


@pytest.fixture(scope="module")
def png() -> bytes:
    data = huge_png()
    assert len(data) < 250_000
    return data


def test_progressive_jpegs_with_1000_scans(server: Server, jpeg: bytes) -> None:
    result = storm(server, lambda: upload(server.port, jpeg))
    _assert_responsive("progressive_jpeg", result)
    _assert_answered(result.outcomes, {"too_many_scans"}, searchable=False)  # 36 MP: under the pixel limit


def test_60_megapixel_pngs(server: Server, png: bytes) -> None:
    result = storm(server, lambda: upload(server.port, png))
    _assert_responsive("png_60mp", result)
    _assert_answered(result.outcomes, {"too_many_pixels"}, searchable=True)  # just under the limit


def test_half_sent_bodies_are_cut_with_408(server: Server, png: bytes) -> None:
    result = storm(server, lambda: upload(server.port, png, stop_after=len(png) // 2))
    _assert_responsive("half_sent", result)
    for o in result.outcomes:
        assert o.status == 408 and ErrorBody.model_validate_json(o.body).error == "body_timeout", (o.status, o.body)
        assert o.closed, "the connection of a stalled body stays open"
        assert BODY_TIMEOUT_S - 1 < o.seconds < BODY_TIMEOUT_S + 10, o.seconds


def test_the_api_still_searches_afterwards(server: Server) -> None:
    buf = io.BytesIO()
    load_photo("astronaut").save(buf, "JPEG", quality=70)
    o = upload(server.port, buf.getvalue())
    assert o.status == 200, o.body[:300]
    assert SearchResponse.model_validate_json(o.body).matches, "the indexed astronaut is not found"
