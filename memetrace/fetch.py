"""Download untrusted image URLs safely and in parallel.

:class:`Fetcher` is what every URL memetrace did not produce goes through: the ingest worker's post
images, the API's search by URL and the batch pipeline's list files. Each hop
(redirects are followed by hand) is vetted before a byte is sent: http/https only, every address
the host resolves to must be public (SSRF guard), and the socket is opened to exactly the address
that was checked, so a second DNS answer cannot point it elsewhere (DNS rebinding). Bodies are
streamed under a byte cap and a wall-clock cap, and kept only if their magic bytes say image.
Nothing raises for a bad URL or response: the :class:`FetchResult` carries a short ``reason``.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self
from urllib.parse import quote, urljoin, urlsplit

if TYPE_CHECKING:
    from memetrace.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RETRYABLE = frozenset({"http_5xx", "timeout", "connection_error"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

_CHUNK = 64 * 1024
_SNIFF_BYTES = 16
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Labels that inet_aton() would read as a number (decimal, 0-octal, 0x-hex).
_NUMERIC_LABEL = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")
# What may reach getaddrinfo and the Host header once IDNA-encoded; anything else is a bad URL.
_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one :class:`Fetcher`; timeouts in seconds."""

    connect_timeout: float = 5.0
    read_timeout: float = 15.0  # per socket read
    request_timeout: float = 60.0  # whole request (headers + body): stops slow-drip servers
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    retries: int = 2
    backoff: float = 0.5
    max_in_flight: int = 16
    per_host: int = 4
    allow_private_networks: bool = False
    trusted_networks: tuple[str, ...] = ()  # CIDRs exempt from the address check (internal mirror)
    user_agent: str = "memetrace/0.1"

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_bytes <= 0 or self.max_in_flight <= 0 or self.per_host <= 0:
            raise ValueError("max_bytes, max_in_flight and per_host must be > 0")
        if self.max_redirects < 0 or self.retries < 0 or self.backoff < 0:
            raise ValueError("max_redirects, retries and backoff must be >= 0")
        for net in self.trusted_networks:
            ipaddress.ip_network(net, strict=False)  # fail at construction, not per request

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        """The policy described by the ``MEMETRACE_FETCH_*`` settings (and MAX_FILE_BYTES)."""
        return cls(connect_timeout=s.fetch_connect_timeout, read_timeout=s.fetch_read_timeout,
                   request_timeout=s.fetch_request_timeout, max_bytes=s.max_file_bytes,
                   retries=s.fetch_retries, max_in_flight=s.fetch_max_in_flight, per_host=s.fetch_per_host,
                   allow_private_networks=s.fetch_allow_private_networks,
                   trusted_networks=tuple(s.fetch_trusted_networks))


@dataclass(frozen=True)
class FetchResult:
    """Outcome of one URL; ``reason`` is None exactly when ``ok``.

    Reasons: bad_url, dns_error, private_address, connection_error (a body shorter than its
    Content-Length too: retried), timeout, tls_error,
    too_many_redirects, http_<status> (4xx and odd 3xx/2xx), http_5xx, bad_response, too_large,
    not_an_image, error (a bug: anything unexpected, caught so the worker survives).
    """

    url: str
    final_url: str
    ok: bool
    data: bytes | None
    content_type: str | None
    reason: str | None
    detail: str
    attempts: int
    seconds: float


class _Fail(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.url: str | None = None
        self.content_type: str | None = None


# ----------------------------------------------------------------------------- address guard


def is_public_address(ip: str | IPAddress) -> bool:
    """True if ``ip`` is globally routable unicast, judging embedded IPv4 in IPv6 forms too."""
    return _rule_broken(ipaddress.ip_address(ip) if isinstance(ip, str) else ip) is None


def _rule_broken(addr: IPAddress) -> str | None:
    """What makes ``addr`` not public ("a loopback address", ...), or None if it is public."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return "a scoped address"
        if addr.ipv4_mapped is not None:
            return _rule_broken(addr.ipv4_mapped)
        if addr in _NAT64:  # the NAT64 gateway would connect to the embedded IPv4
            return _rule_broken(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if addr.teredo is not None:
            return "a Teredo tunnel address"  # tunnel endpoints we cannot vouch for
        if addr.sixtofour is not None and (embedded := _rule_broken(addr.sixtofour)) is not None:
            return embedded
    kinds = (("loopback", addr.is_loopback), ("link-local", addr.is_link_local), ("multicast", addr.is_multicast),
             ("unspecified", addr.is_unspecified), ("private", addr.is_private), ("reserved", addr.is_reserved),
             ("site-local", isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local),
             ("non-global", not addr.is_global))
    return next((f"a {kind} address" for kind, broken in kinds if broken), None)


def _parse_inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` the way inet_aton() does (``2130706433``, ``0177.0.0.1``, ``0x7f.1``).

    Returns None if the host is not numeric-looking at all (so it is a DNS name); raises bad_url
    if it looks numeric but is out of range, so that no resolver gets to guess what it means.
    """
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not 1 <= len(labels) <= 4 or not all(_NUMERIC_LABEL.fullmatch(x) for x in labels):
        return None
    try:
        nums = [
            int(x, 16) if x[:2].lower() == "0x" else int(x, 8) if len(x) > 1 and x[0] == "0" else int(x) for x in labels
        ]
    except ValueError:  # "0x" alone, or 8/9 in an octal label
        raise _Fail("bad_url", f"malformed numeric host {host!r}") from None
    *head, last = nums
    last_bits = 8 * (5 - len(nums))
    if any(n > 0xFF for n in head) or last >= 1 << last_bits:
        raise _Fail("bad_url", f"numeric host out of range {host!r}")
    value = 0
    for n in head:
        value = value << 8 | n
    return ipaddress.IPv4Address(value << last_bits | last)


def _literal_address(host: str) -> IPAddress | None:
    """The address ``host`` spells out (IPv4, IPv6, inet_aton forms), or None for a DNS name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _parse_inet_aton(host)


def resolve_host(host: str, port: int = 80) -> list[IPAddress]:
    """Every address ``host`` stands for; numeric forms are parsed here, not by the resolver."""
    host = host.strip("[]")
    literal = _literal_address(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _Fail("dns_error", f"{host}: {e}") from None
    out: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        addr = ipaddress.ip_address(sockaddr[0])
        if isinstance(addr, ipaddress.IPv6Address) and len(sockaddr) >= 4 and sockaddr[3] and not addr.scope_id:
            addr = ipaddress.IPv6Address(f"{addr}%{sockaddr[3]}")  # keep the scope for connect()
        if addr not in out:
            out.append(addr)
    if not out:
        raise _Fail("dns_error", f"{host}: no addresses")
    return out


def _vet(host: str, addrs: Sequence[IPAddress], trusted: Sequence[IPNetwork]) -> None:
    """Refuse unless every address of ``host`` is public or trusted. The message names the rule
    broken, never a resolved address: a caller must not learn what internal names resolve to."""
    for addr in addrs:
        if any(addr.version == net.version and addr in net for net in trusted):
            continue
        rule = _rule_broken(addr)
        if rule is not None:
            verb = "is" if _literal_address(host) is not None else "resolves to"
            raise _Fail("private_address", f"{host} {verb} {rule}, not a public address; only public hosts "
                                           "are fetched (MEMETRACE_FETCH_TRUSTED_NETWORKS lists exceptions)")


def check_address(host: str, trusted_networks: Sequence[str] = ()) -> str | None:
    """None if every address of ``host`` is public (or trusted), else a reason code.

    Reasons: ``private_address``, ``dns_error``, ``bad_url`` (malformed numeric host).
    """
    trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_networks]
    try:
        _vet(host, resolve_host(host), trusted)
    except _Fail as f:
        return f.reason
    return None


# ----------------------------------------------------------------------------- content checks


def sniff_image(head: bytes) -> str | None:
    """Format name from magic bytes (jpeg, png, gif, webp, bmp, tiff), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # IDNA/ASCII, lower case, no brackets
    port: int
    path: str  # request target: path + query, percent-encoded


def _parse_url(url: object) -> _Target:
    if not isinstance(url, str) or not url or len(url) > 8192:
        raise _Fail("bad_url", "not a non-empty string of sane length")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise _Fail("bad_url", str(e)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Fail("bad_url", f"scheme {scheme!r} not allowed")
    host = parts.hostname
    if not host:
        raise _Fail("bad_url", "no host")
    if ":" in host:  # IPv6 literal: must parse, no IDNA
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Fail("bad_url", f"bad IPv6 literal {host!r}") from None
    else:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Fail("bad_url", f"bad hostname {host!r}") from None
        if not _HOST_CHARS.fullmatch(host):
            raise _Fail("bad_url", f"bad hostname {host!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # Encode spaces and non-ASCII but keep existing escapes and reserved characters as they are.
    path = quote(path, safe="/?&=%:@!$'()*+,;~[]")
    return _Target(scheme, host.lower(), port or (443 if scheme == "https" else 80), path)


# ----------------------------------------------------------------------------- transport


def _open_socket(addrs: Sequence[IPAddress], port: int, timeout: float, deadline: float) -> socket.socket:
    """Connect to the first reachable vetted address; numeric sockaddrs mean no DNS here."""
    last: OSError | None = None
    for addr in addrs:
        left = deadline - time.monotonic()
        if left <= 0:  # many black-holed addresses must not add up to minutes
            raise TimeoutError("no address answered within request_timeout")
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(min(timeout, left))
        try:
            sock.connect((str(addr), port))
            return sock
        except OSError as e:
            sock.close()
            last = e
    assert last is not None
    raise last


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to already-vetted addresses; Host header, SNI and cert check use the hostname."""

    def __init__(
        self, target: _Target, addrs: Sequence[IPAddress], tls: ssl.SSLContext | None, timeout: float, deadline: float
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.connect_timeout = timeout
        self.deadline = deadline
        self.default_port = 443 if tls else 80  # so Host omits the default port, as clients do
        self._addrs = addrs
        self._tls = tls
        # http.client drops self.sock once a "Connection: close" response owns it; keep our own.
        self.pinned: socket.socket | None = None

    def connect(self) -> None:
        sock = _open_socket(self._addrs, self.port, self.connect_timeout, self.deadline)
        self.sock = self.pinned = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                # Handshake only once the watchdog can see the TLS socket, so a stalled handshake
                # is cut off too.
                sock = self._tls.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
                self.sock = self.pinned = sock
                sock.do_handshake()
        except BaseException:
            sock.close()
            raise


class _HostLimiter:
    """At most ``limit`` concurrent requests per host; the table only holds busy hosts."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._cond = threading.Condition()
        self._busy: dict[str, int] = {}

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        with self._cond:
            while self._busy.get(host, 0) >= self._limit:
                self._cond.wait()
            self._busy[host] = self._busy.get(host, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._busy[host] - 1
                if left:
                    self._busy[host] = left
                else:
                    del self._busy[host]
                self._cond.notify_all()


# ----------------------------------------------------------------------------- fetcher


class Fetcher:
    """Thread-safe fetcher; share one per process so the per-host limit is global."""

    def __init__(self, policy: FetchPolicy | None = None, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy or FetchPolicy()
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in self.policy.trusted_networks]
        self._ssl = ssl_context or ssl.create_default_context()
        self._hosts = _HostLimiter(self.policy.per_host)

    def fetch(self, url: str) -> FetchResult:
        """Download one image URL; never raises."""
        start = time.monotonic()
        shown = url if isinstance(url, str) else repr(url)
        attempts = 0
        while True:
            attempts += 1
            try:
                final_url, data, ctype = self._attempt(url)
                return FetchResult(url, final_url, True, data, ctype, None, "", attempts, time.monotonic() - start)
            except _Fail as f:
                fail = f
            except Exception as e:  # noqa: BLE001 - a worker must survive anything a hostile server provokes
                fail = _Fail("error", f"{type(e).__name__}: {e}")
            if fail.reason not in RETRYABLE or attempts > self.policy.retries:
                return FetchResult(
                    url=shown,
                    final_url=fail.url or shown,
                    ok=False,
                    data=None,
                    content_type=fail.content_type,
                    reason=fail.reason,
                    detail=fail.detail,
                    attempts=attempts,
                    seconds=time.monotonic() - start,
                )
            time.sleep(self.policy.backoff * 2 ** (attempts - 1))

    def fetch_many(self, urls: Iterable[str]) -> list[FetchResult]:
        """:meth:`fetch` each URL in parallel (max_in_flight threads); results in input order."""
        todo = list(urls)
        if not todo:
            return []
        workers = min(self.policy.max_in_flight, len(todo))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
            return list(pool.map(self.fetch, todo))

    def _attempt(self, url: str) -> tuple[str, bytes, str | None]:
        current = url
        for _ in range(self.policy.max_redirects + 1):
            try:
                location, data, ctype = self._request(current)
            except _Fail as f:
                f.url = current if isinstance(current, str) else None
                raise
            if location is None:
                assert data is not None
                return current, data, ctype
            current = location
        fail = _Fail("too_many_redirects", f"more than {self.policy.max_redirects}")
        fail.url = current
        raise fail

    def _request(self, url: str) -> tuple[str | None, bytes | None, str | None]:
        """One hop: (redirect location, None, None) or (None, body, content type)."""
        p = self.policy
        target = _parse_url(url)
        addrs = resolve_host(target.host, target.port)
        if not p.allow_private_networks:
            _vet(target.host, addrs, self._trusted)
        with self._hosts.slot(target.host):
            tls = self._ssl if target.scheme == "https" else None
            conn = _PinnedConnection(target, addrs, tls, p.connect_timeout, time.monotonic() + p.request_timeout)
            ctype: str | None = None
            resp: http.client.HTTPResponse | None = None
            with _Watchdog(conn, p.request_timeout) as dog:
                try:
                    conn.connect()
                    assert conn.sock is not None
                    dog.check()
                    conn.sock.settimeout(p.read_timeout)
                    conn.putrequest("GET", target.path, skip_accept_encoding=True)
                    conn.putheader("User-Agent", p.user_agent)
                    conn.putheader("Accept", "image/*")
                    conn.putheader("Accept-Encoding", "identity")  # raw bytes only: no decompression bombs
                    conn.putheader("Connection", "close")
                    conn.endheaders()
                    resp = conn.getresponse()
                    dog.check()  # headers cut short by the watchdog are not headers
                    status = resp.status
                    ctype = resp.getheader("Content-Type")
                    if status in REDIRECT_STATUSES:
                        location = resp.getheader("Location")
                        if not location:
                            raise _Fail(f"http_{status}", "redirect without Location")
                        return urljoin(url, location.strip()), None, None
                    if status >= 500:
                        raise _Fail("http_5xx", f"HTTP {status} {resp.reason}")
                    if status != 200:
                        raise _Fail(f"http_{status}", f"HTTP {status} {resp.reason}")
                    data = self._read_body(resp)
                    dog.check()  # an EOF forced by the watchdog is not the end of the body
                    return None, data, ctype
                except _Fail as f:
                    dog.check()  # whatever a cut-off request looked like, it was a timeout
                    f.content_type = ctype
                    raise
                except Exception as e:  # noqa: BLE001 - classified below, never leaks
                    dog.check()
                    raise _classify(e) from None
                finally:
                    if resp is not None:
                        resp.close()  # releases the socket now, not at garbage collection

    def _read_body(self, resp: http.client.HTTPResponse) -> bytes:
        limit = self.policy.max_bytes
        declared = (resp.getheader("Content-Length") or "").strip()
        expected = int(declared) if declared.isdigit() else None
        if expected is not None and expected > limit:
            raise _Fail("too_large", f"Content-Length {expected} > {limit}")
        buf = bytearray()
        sniffed = False
        while chunk := resp.read1(_CHUNK):
            buf += chunk
            if len(buf) > limit:
                raise _Fail("too_large", f"body exceeds {limit} bytes")
            if not sniffed and len(buf) >= _SNIFF_BYTES:
                if sniff_image(bytes(buf[:_SNIFF_BYTES])) is None:  # stop HTML pages early
                    raise _Fail("not_an_image", f"magic bytes {bytes(buf[:8])!r}")
                sniffed = True
        if expected is not None and len(buf) < expected:  # the connection was cut: worth another try
            raise _Fail("connection_error", f"body ended after {len(buf)} of its {expected} bytes (Content-Length)")
        if not sniffed and sniff_image(bytes(buf)) is None:
            raise _Fail("not_an_image", f"magic bytes {bytes(buf[:8])!r}" if buf else "empty body")
        return bytes(buf)


def _classify(e: Exception) -> _Fail:
    """Map a transport exception to a reason code (order matters: subclasses first)."""
    if isinstance(e, TimeoutError):
        return _Fail("timeout", str(e) or "timed out")
    if isinstance(e, ssl.SSLCertVerificationError):
        return _Fail("tls_error", e.verify_message or str(e))
    if isinstance(e, http.client.InvalidURL):
        return _Fail("bad_url", str(e))
    if isinstance(e, (OSError, http.client.IncompleteRead)):  # RemoteDisconnected is an OSError
        return _Fail("connection_error", f"{type(e).__name__}: {e}")
    if isinstance(e, http.client.HTTPException):
        return _Fail("bad_response", f"{type(e).__name__}: {e}")
    return _Fail("error", f"{type(e).__name__}: {e}")


class _Watchdog:
    """Caps one request's wall time: read timeouts are per recv, so a server dripping a byte at a
    time (headers included) could otherwise hold a worker for hours. On expiry it shuts the socket
    down, which wakes the blocked read; :meth:`check` then turns whatever came of it into a timeout.
    """

    def __init__(self, conn: _PinnedConnection, seconds: float) -> None:
        self._conn = conn
        self._seconds = seconds
        self._lock = threading.Lock()
        self._done = False
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            sock = self._conn.pinned
            if sock is not None:
                try:
                    # The plain socket method: SSLSocket.shutdown would drop its SSL object under
                    # the reading thread's feet.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def check(self) -> None:
        if self.expired:
            raise _Fail("timeout", f"request_timeout {self._seconds}s exceeded")

    def __enter__(self) -> Self:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:  # after this, _expire cannot touch a socket whose fd may be reused
            self._done = True
            self._conn.close()
            if self._conn.pinned is not None:
                self._conn.pinned.close()  # the fd itself goes once the response is closed too
