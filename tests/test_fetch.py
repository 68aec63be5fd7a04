"""memetrace.fetch against a real local server. Sockets go to 127.0.0.1 only, never anywhere else."""

from __future__ import annotations

import collections
import io
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from memetrace.fetch import Fetcher, FetchPolicy, check_address, is_public_address, resolve_host, sniff_image

LOOPBACK_ONLY = ("127.0.0.1/32",)  # trust the test server's address and nothing else
HUGE = 100_000_000


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85)
    return out.getvalue()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


JPEG = _jpeg()
PNG = _png()


@dataclass
class State:
    hits: collections.Counter[str] = field(default_factory=collections.Counter)
    hosts: list[str] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    max_active: int = 0
    connections: int = 0
    huge_sent: int = 0
    huge_done: threading.Event = field(default_factory=threading.Event)
    port: int = 0


class Handler(BaseHTTPRequestHandler):
    state: State  # set per server

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ssl.SSLError, ConnectionError):
            pass  # TLS tests: the client rejects our certificate on purpose

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        st = self.state
        path = self.path.split("?", 1)[0]
        with st.lock:
            st.hits[path] += 1
            hit = st.hits[path]
        try:
            if path == "/photo.jpg":
                self._send(200, JPEG)
            elif path == "/png-as-text":
                self._send(200, PNG, "text/plain")
            elif path == "/truncated.jpg":
                self._send(200, JPEG[: len(JPEG) // 2])
            elif path == "/cut-body":  # declares the whole photo, sends half, hangs up
                self._send_cut()
            elif path == "/cut-once":  # a network cut, then the whole photo
                self._send_cut() if hit == 1 else self._send(200, JPEG)
            elif path == "/page.html":
                self._send(200, b"<!doctype html><html><body>" + b"x" * 5000 + b"</body></html>", "image/jpeg")
            elif path == "/empty":
                self._send(200, b"")
            elif path == "/slow":
                time.sleep(1.0)
                self._send(200, JPEG)
            elif path == "/drip":  # headers fast, then a byte every 50 ms: only a wall-clock cap stops it
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"\xff\xd8\xff\xe0")
                for _ in range(60):
                    time.sleep(0.05)
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            elif path == "/drip-headers":  # the status line, then a header byte every 50 ms
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(60):
                    time.sleep(0.05)
                    self.wfile.write(b"a")
                    self.wfile.flush()
            elif path == "/404":
                self._send(404, b"nope", "text/plain")
            elif path == "/500":
                self._send(500, b"boom", "text/plain")
            elif path == "/flaky":  # two failures, then the photo
                self._send(503, b"busy", "text/plain") if hit <= 2 else self._send(200, JPEG)
            elif path.startswith("/r/"):
                n = int(path[3:])
                nxt = "/photo.jpg" if n == 0 else f"/r/{n - 1}"
                # alternate relative and absolute Locations and several statuses
                loc = nxt if n % 2 else f"http://127.0.0.1:{st.port}{nxt}"
                self._send((301, 302, 303, 307, 308)[n % 5], b"", "text/plain", Location=loc)
            elif path == "/loop":
                self._send(302, b"", "text/plain", Location="/loop")
            elif path == "/to-metadata":
                self._send(302, b"", "text/plain", Location="http://169.254.169.254/latest/meta-data/")
            elif path == "/to-other-loopback":
                self._send(302, b"", "text/plain", Location=f"http://127.0.0.2:{st.port}/photo.jpg")
            elif path == "/to-file":
                self._send(302, b"", "text/plain", Location="file:///etc/passwd")
            elif path == "/huge-declared":
                self._stream_huge(declare=True)
            elif path == "/huge-stream":
                self._stream_huge(declare=False)
            elif path == "/conc":
                with st.lock:
                    st.active += 1
                    st.max_active = max(st.max_active, st.active)
                time.sleep(0.15)
                with st.lock:  # before replying: the client frees its slot only after the reply
                    st.active -= 1
                i = self.path.split("i=", 1)[1]
                self._send(200, b"\xff\xd8\xff\xe0" + f"#{i}#".encode())
            elif path == "/echo-host":
                with st.lock:
                    st.hosts.append(self.headers.get("Host", ""))
                self._send(200, JPEG)
            else:
                self._send(404, b"", "text/plain")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client hung up on purpose (too_large, timeout)

    def _send_cut(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(JPEG)))
        self.end_headers()
        self.wfile.write(JPEG[: len(JPEG) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _stream_huge(self, declare: bool) -> None:
        """100 MB generated lazily; counts what was really written before the client gave up."""
        st = self.state
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if declare:
            self.send_header("Content-Length", str(HUGE))
        self.end_headers()
        chunk = b"\xff\xd8\xff\xe0" + bytes(64 * 1024 - 4)
        sent = 0
        try:
            while sent < HUGE:
                self.wfile.write(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            st.huge_sent = sent
            st.huge_done.set()


def _serve(tls: ssl.SSLContext | None = None) -> Generator[tuple[str, State], None, None]:
    state = State()
    handler = type("BoundHandler", (Handler,), {"state": state})

    class CountingServer(ThreadingHTTPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            with state.lock:
                state.connections += 1  # every accepted TCP connection, request or not
            return True

    server = CountingServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{state.port}", state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server() -> Iterator[tuple[str, State]]:
    yield from _serve()


def fetcher(**kw: object) -> Fetcher:
    base: dict[str, object] = {
        "trusted_networks": LOOPBACK_ONLY,
        "backoff": 0.01,
        "read_timeout": 2.0,
        "connect_timeout": 2.0,
    }
    base.update(kw)
    return Fetcher(FetchPolicy(**base))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- address guard

PRIVATE_HOSTS = [
    "127.0.0.1",
    "127.1",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0",
    "0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "[::1]",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:7f00:1",
    "::127.0.0.1",  # deprecated IPv4-compatible
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "64:ff9b::7f00:1",  # NAT64 of loopback
    "64:ff9b::a9fe:a9fe",  # NAT64 of metadata
    "2002:7f00:1::1",  # 6to4 of loopback
    "2002:a9fe:a9fe::1",  # 6to4 of metadata
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2130706433",  # decimal 127.0.0.1
    "0177.0.0.1",  # octal
    "0x7f000001",  # hex
    "0x7f.1",
    "0x7F.0.0.0x1",
    "017700000001",  # octal, one label
    "0xa9.0xfe.0xa9.0xfe",
    "3232235777",  # 192.168.1.1
    "localhost",
]


@pytest.mark.parametrize("host", PRIVATE_HOSTS)
def test_check_address_refuses_private_forms(host: str) -> None:
    assert check_address(host) == "private_address"


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1", "134744072"]
)
def test_check_address_accepts_public_literals(host: str) -> None:
    assert check_address(host) is None  # numeric: no DNS involved


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("1.2.65535", "1.2.255.255"),
        ("010.0x10.1", "8.16.0.1"),
    ],
)
def test_numeric_hosts_are_parsed_like_inet_aton(host: str, expected: str) -> None:
    assert [str(a) for a in resolve_host(host)] == [expected]
    assert socket.inet_ntoa(socket.inet_aton(host)) == expected  # the libc agrees


@pytest.mark.parametrize("host", ["256.1.1.1", "1.16777216", "08.0.0.1", "0x", "4294967296"])
def test_numeric_hosts_out_of_range_are_bad_urls(host: str) -> None:
    assert check_address(host) == "bad_url"


def test_check_address_refuses_if_any_resolved_address_is_private(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        "mixed.example": ["93.184.216.34", "10.0.0.5"],
        "public.example": ["93.184.216.34", "2606:2800:220:1::1"],
    }

    def fake_getaddrinfo(host: str, port: object, *args: object, **kw: object) -> list[tuple[Any, ...]]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 80)) for a in answers[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert check_address("mixed.example") == "private_address"
    assert check_address("public.example") is None
    assert check_address("nowhere.example") == "dns_error"
    assert check_address("mixed.example", trusted_networks=["10.0.0.0/8"]) is None


def test_refusals_name_the_rule_not_the_resolved_address(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"intranet.example": "10.20.30.40", "metadata.example": "169.254.169.254", "lo.example": "127.0.0.7"}

    def fake_getaddrinfo(host: str, port: object, *args: object, **kw: object) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    f = Fetcher(FetchPolicy(retries=0))
    for host, rule in (("intranet.example", "a private address"), ("metadata.example", "a link-local address"),
                       ("lo.example", "a loopback address")):
        r = f.fetch(f"http://{host}/photo.jpg")
        assert (r.ok, r.reason) == (False, "private_address")
        assert f"{host} resolves to {rule}, not a public address" in r.detail
        assert answers[host] not in r.detail and answers[host] not in r.final_url


def test_refusal_of_an_address_literal_names_the_rule() -> None:
    r = Fetcher(FetchPolicy(retries=0)).fetch("http://0x7f.1/photo.jpg")
    assert (r.ok, r.reason) == (False, "private_address")
    assert r.detail.startswith("0x7f.1 is a loopback address, not a public address")


def test_is_public_address_and_sniff() -> None:
    assert is_public_address("93.184.216.34") and not is_public_address("192.168.0.1")
    assert sniff_image(JPEG) == "jpeg" and sniff_image(PNG) == "png"
    assert sniff_image(b"GIF89a....") == "gif" and sniff_image(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_image(b"BM\0\0") == "bmp" and sniff_image(b"II*\0") == "tiff" and sniff_image(b"MM\0*") == "tiff"
    assert sniff_image(b"<html>") is None and sniff_image(b"RIFF\0\0\0\0WAVE") is None and sniff_image(b"") is None


# ----------------------------------------------------------------------------- end to end


def test_photo(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher().fetch(f"{base}/photo.jpg")
    assert r.ok and r.reason is None and r.detail == ""
    assert r.data == JPEG and r.content_type == "image/jpeg"
    assert r.final_url == r.url == f"{base}/photo.jpg" and r.attempts == 1 and 0 < r.seconds < 2
    assert st.hits["/photo.jpg"] == 1


def test_content_type_is_ignored_magic_bytes_decide(server: tuple[str, State]) -> None:
    base, _ = server
    f = fetcher()
    png = f.fetch(f"{base}/png-as-text")
    assert png.ok and png.data == PNG and png.content_type == "text/plain"
    html = f.fetch(f"{base}/page.html")  # claims image/jpeg
    assert (html.ok, html.reason, html.data, html.attempts) == (False, "not_an_image", None, 1)
    empty = f.fetch(f"{base}/empty")
    assert (empty.ok, empty.reason) == (False, "not_an_image")


def test_truncated_jpeg_is_returned(server: tuple[str, State]) -> None:
    base, _ = server
    r = fetcher().fetch(f"{base}/truncated.jpg")
    assert r.ok and r.data == JPEG[: len(JPEG) // 2]  # decoding (and refusing) is imageio's job


def test_body_shorter_than_its_content_length_is_a_retried_connection_error(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher(retries=2).fetch(f"{base}/cut-body")
    assert (r.ok, r.reason, r.attempts, r.data) == (False, "connection_error", 3, None)
    assert f"{len(JPEG) // 2} of its {len(JPEG)} bytes" in r.detail
    assert st.hits["/cut-body"] == 3
    again = fetcher(retries=2).fetch(f"{base}/cut-once")
    assert again.ok and again.attempts == 2 and again.data == JPEG


def test_private_server_refused_before_any_request(server: tuple[str, State]) -> None:
    base, st = server
    port = st.port
    f = Fetcher(FetchPolicy(retries=2, backoff=0.01))  # defaults: no private networks, nothing trusted
    urls = [
        f"{base}/photo.jpg",
        f"http://localhost:{port}/photo.jpg",
        f"http://2130706433:{port}/photo.jpg",
        f"http://0177.0.0.1:{port}/photo.jpg",
        f"http://0x7f.1:{port}/photo.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/photo.jpg",
        f"http://user:pw@127.0.0.1:{port}/photo.jpg",
    ]
    for r in f.fetch_many(urls):
        assert (r.ok, r.reason, r.attempts) == (False, "private_address", 1), r
    assert st.connections == 0 and sum(st.hits.values()) == 0


def test_allow_private_networks(server: tuple[str, State]) -> None:
    base, _ = server
    r = Fetcher(FetchPolicy(allow_private_networks=True)).fetch(f"{base}/photo.jpg")
    assert r.ok and r.data == JPEG


def test_redirect_chain(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher(max_redirects=5).fetch(f"{base}/r/4")
    assert r.ok and r.data == JPEG
    assert r.final_url == f"{base}/photo.jpg" and r.url == f"{base}/r/4"
    assert [st.hits[f"/r/{i}"] for i in range(5)] == [1] * 5


def test_too_many_redirects(server: tuple[str, State]) -> None:
    base, st = server
    short = fetcher(max_redirects=3).fetch(f"{base}/r/4")  # needs 5 hops
    assert (short.ok, short.reason, short.attempts) == (False, "too_many_redirects", 1)
    assert short.final_url == f"{base}/r/0"
    loop = fetcher(max_redirects=3, retries=2).fetch(f"{base}/loop")
    assert (loop.ok, loop.reason, loop.attempts) == (False, "too_many_redirects", 1)
    assert st.hits["/loop"] == 4  # the request plus 3 followed redirects, no retry


@pytest.mark.parametrize(
    ("path", "final"),
    [
        ("/to-metadata", "http://169.254.169.254/latest/meta-data/"),
        ("/to-other-loopback", "http://127.0.0.2:{port}/photo.jpg"),
    ],
)
def test_redirect_to_private_address_is_refused(server: tuple[str, State], path: str, final: str) -> None:
    base, st = server
    r = fetcher(retries=2).fetch(base + path)  # the first hop is trusted, the second is not
    assert (r.ok, r.reason, r.attempts) == (False, "private_address", 1)
    assert r.final_url == final.format(port=st.port)
    assert st.hits[path] == 1 and st.hits["/photo.jpg"] == 0


def test_redirect_to_other_scheme_is_refused(server: tuple[str, State]) -> None:
    base, _ = server
    r = fetcher().fetch(f"{base}/to-file")
    assert (r.ok, r.reason, r.final_url) == (False, "bad_url", "file:///etc/passwd")


def test_404_is_not_retried(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher(retries=3).fetch(f"{base}/404")
    assert (r.ok, r.reason, r.attempts, r.content_type) == (False, "http_404", 1, "text/plain")
    assert st.hits["/404"] == 1


def test_5xx_is_retried_with_backoff(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher(retries=2, backoff=0.05).fetch(f"{base}/500")
    assert (r.ok, r.reason, r.attempts) == (False, "http_5xx", 3)
    assert "500" in r.detail
    assert st.hits["/500"] == 3
    assert r.seconds >= 0.05 + 0.1  # backoff doubles: 0.05 then 0.1


def test_flaky_server_recovers(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher(retries=2).fetch(f"{base}/flaky")
    assert r.ok and r.attempts == 3 and r.data == JPEG
    assert st.hits["/flaky"] == 3


def test_slow_server_times_out_and_is_retried(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher(read_timeout=0.3, retries=1).fetch(f"{base}/slow")
    assert (r.ok, r.reason, r.attempts) == (False, "timeout", 2)
    assert st.hits["/slow"] == 2
    assert 0.6 <= r.seconds < 1.5


def test_dripping_server_hits_the_request_timeout(server: tuple[str, State]) -> None:
    base, _ = server
    r = fetcher(read_timeout=1.0, request_timeout=0.5, retries=0).fetch(f"{base}/drip")
    assert (r.ok, r.reason, r.attempts) == (False, "timeout", 1)
    assert "request_timeout" in r.detail
    assert 0.45 <= r.seconds < 1.0


def test_dripping_headers_hit_the_request_timeout(server: tuple[str, State]) -> None:
    base, _ = server
    r = fetcher(read_timeout=1.0, request_timeout=0.5, retries=0).fetch(f"{base}/drip-headers")
    assert (r.ok, r.reason, r.attempts) == (False, "timeout", 1)
    assert 0.45 <= r.seconds < 1.0


def test_stalled_tls_handshake_hits_the_request_timeout() -> None:
    with socket.socket() as listener:  # accepts TCP (kernel backlog) but never speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        r = fetcher(connect_timeout=2.0, request_timeout=0.4, retries=0).fetch(f"https://127.0.0.1:{port}/x.jpg")
    assert (r.ok, r.reason, r.attempts) == (False, "timeout", 1)
    assert 0.35 <= r.seconds < 1.0


def test_connection_refused_is_retried() -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = fetcher(retries=1).fetch(f"http://127.0.0.1:{port}/photo.jpg")
    assert (r.ok, r.reason, r.attempts) == (False, "connection_error", 2)


def test_declared_huge_body_refused_from_headers(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher(max_bytes=1_000_000, retries=2).fetch(f"{base}/huge-declared")
    assert (r.ok, r.reason, r.attempts, r.data) == (False, "too_large", 1, None)
    assert "Content-Length" in r.detail and r.seconds < 2
    assert st.huge_done.wait(5)
    assert st.huge_sent < 20_000_000  # the server could not push the 100 MB


def test_streamed_huge_body_aborted_early(server: tuple[str, State]) -> None:
    base, st = server
    r = fetcher(max_bytes=1_000_000, retries=2).fetch(f"{base}/huge-stream")
    assert (r.ok, r.reason, r.attempts, r.data) == (False, "too_large", 1, None)
    assert "exceeds" in r.detail and r.seconds < 2
    assert st.huge_done.wait(5)
    assert st.huge_sent < 20_000_000


@pytest.mark.parametrize(
    "url",
    [
        "",
        "photo.jpg",
        "ftp://127.0.0.1/photo.jpg",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http://",
        "http:///photo.jpg",
        "http://[::1/photo.jpg",
        "http://127.0.0.1:99999/photo.jpg",
        "http://exa mple.com/photo.jpg",
        "http://256.0.0.1/photo.jpg",
        "http://0x/photo.jpg",
        "http://[fe80::zz]/photo.jpg",
        12345,
        None,
    ],
)
def test_bad_urls_never_raise(url: object) -> None:
    r = fetcher(retries=3).fetch(url)  # type: ignore[arg-type]
    assert (r.ok, r.reason, r.attempts, r.data) == (False, "bad_url", 1, None)


def test_connects_to_the_checked_address_with_the_original_host(
    server: tuple[str, State], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, st = server
    lookups: list[str] = []

    def fake_getaddrinfo(host: str, port: int, *args: object, **kw: object) -> list[tuple[Any, ...]]:
        lookups.append(host)
        assert host == "images.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    r = fetcher().fetch(f"http://images.example:{st.port}/echo-host")
    assert r.ok and r.data == JPEG
    assert lookups == ["images.example"]  # one lookup: the socket went to the address that was checked
    assert st.hosts == [f"images.example:{st.port}"]


def test_fetch_many_keeps_order_and_mixes_outcomes(server: tuple[str, State]) -> None:
    base, _ = server
    urls = [f"{base}/photo.jpg", f"{base}/404", "gopher://x/", f"{base}/page.html", f"{base}/png-as-text"]
    got = fetcher().fetch_many(urls)
    assert [r.url for r in got] == urls
    assert [r.reason for r in got] == [None, "http_404", "bad_url", "not_an_image", None]
    assert fetcher().fetch_many([]) == []


def test_per_host_limit_holds_under_parallel_load(server: tuple[str, State]) -> None:
    base, st = server
    urls = [f"{base}/conc?i={i}" for i in range(12)]
    t0 = time.monotonic()
    got = fetcher(per_host=3, max_in_flight=16).fetch_many(urls)
    elapsed = time.monotonic() - t0
    assert [r.data for r in got] == [b"\xff\xd8\xff\xe0" + f"#{i}#".encode() for i in range(12)]
    assert st.max_active == 3  # parallel, but never more than per_host at once
    assert elapsed >= 4 * 0.15 - 0.05  # 12 requests through 3 slots: at least 4 rounds


def test_max_in_flight_bounds_threads(server: tuple[str, State]) -> None:
    base, st = server
    got = fetcher(per_host=8, max_in_flight=2).fetch_many([f"{base}/conc?i={i}" for i in range(6)])
    assert all(r.ok for r in got) and st.max_active == 2


# ----------------------------------------------------------------------------- https


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=images.example",
         "-addext", "subjectAltName=DNS:images.example"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


@pytest.fixture
def tls_server(cert: tuple[Path, Path]) -> Iterator[tuple[str, State]]:
    crt, key = cert
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    holder: list[State] = []

    def on_sni(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        holder[0].sni.append(name)

    ctx.sni_callback = on_sni
    gen = _serve(ctx)
    base, st = next(gen)
    holder.append(st)
    yield base, st
    gen.close()


def _resolve_images_example(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def fake(host: str, port: int, *args: object, **kw: object) -> list[tuple[Any, ...]]:
        if host == "images.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_https_pins_ip_but_uses_hostname_for_sni_and_cert(
    tls_server: tuple[str, State], cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, st = tls_server
    _resolve_images_example(monkeypatch)
    trusting = ssl.create_default_context(cafile=str(cert[0]))
    f = Fetcher(FetchPolicy(trusted_networks=LOOPBACK_ONLY, retries=0), ssl_context=trusting)
    r = f.fetch(f"https://images.example:{st.port}/echo-host")
    assert r.ok and r.data == JPEG
    assert st.sni == ["images.example"] and st.hosts == [f"images.example:{st.port}"]


def test_https_verifies_certificates(
    tls_server: tuple[str, State], cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, st = tls_server
    _resolve_images_example(monkeypatch)
    untrusted = fetcher(retries=2).fetch(f"https://images.example:{st.port}/photo.jpg")  # system CAs only
    assert (untrusted.ok, untrusted.reason, untrusted.attempts) == (False, "tls_error", 1)
    trusting = ssl.create_default_context(cafile=str(cert[0]))
    f = Fetcher(FetchPolicy(trusted_networks=LOOPBACK_ONLY, retries=0), ssl_context=trusting)
    wrong_name = f.fetch(f"{base}/photo.jpg")  # cert is for images.example, not 127.0.0.1
    assert (wrong_name.ok, wrong_name.reason) == (False, "tls_error")
    assert sum(st.hits.values()) == 0
