"""Peak memory of decoding 60-megapixel images stays under the Kubernetes memory limits shipped in
deploy/k8s (read from the manifests, so a limit lowered there is checked here).

Each case runs in a subprocess whose peak resident set size (``ru_maxrss`` from ``wait4``) is the
measure: the test process' own memory does not count. The images are 10000 x 6000 PNGs of
identical rows, 190 KB each on disk, 180 MB each decompressed; PNG cannot be decoded at
reduced size, so every one is decompressed in full, under the decode budget. The ingest worker's
case serves them over HTTP padded to 40 MB each, so that the downloads it holds count too.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 10_000, 6_000  # 60 megapixels: MEMETRACE_MAX_PIXELS' default, still accepted
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}

pytestmark = pytest.mark.slow


def memory_limit(manifest: str) -> int:
    """Bytes of the memory limit of the (one) container of the Deployment in deploy/k8s/base/<manifest>."""
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / "base" / manifest).read_text()) if d]
    deployment = next(d for d in docs if d.get("kind") == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    value = str(container["resources"]["limits"]["memory"])
    unit = next((u for u in sorted(UNITS, key=len, reverse=True) if value.endswith(u)), "")
    return int(float(value.removesuffix(unit)) * UNITS.get(unit, 1))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def big_png(label: str) -> bytes:
    """A WIDTH x HEIGHT RGB PNG: a horizontal gradient whose rows after the first are 'same as above'
    (filter Up, all zeros), so it compresses to a few hundred KB; ``label`` makes its bytes unique."""
    first = b"\x00" + bytes((x * 255 // WIDTH) for x in range(WIDTH) for _ in range(3))
    up = b"\x02" + bytes(3 * WIDTH)
    z = zlib.compressobj(9)
    idat = bytearray(z.compress(first))
    for _ in range(HEIGHT - 1):
        idat += z.compress(up)
    idat += z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", WIDTH, HEIGHT, 8, 2, 0, 0, 0))
            + _chunk(b"tEXt", b"Comment\x00" + label.encode()) + _chunk(b"IDAT", bytes(idat)) + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def png() -> bytes:
    return big_png("0")


def run_measured(args: list[str], env: dict[str, str], logs: Path, timeout: float = 900) -> tuple[str, int]:
    """Run ``args`` to completion; its stdout and its own peak resident set size in bytes."""
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=err)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err_path.read_text()[-4000:]
    return out_path.read_text(), usage.ru_maxrss * 1024  # Linux: KiB


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEMETRACE_")}
    return env | overrides


def test_limits_are_read_from_the_manifests() -> None:
    assert memory_limit("ingest.yaml") == 6 * 2**30 and memory_limit("serve.yaml") == 4 * 2**30


def test_png_fixture_is_what_it_claims(png: bytes) -> None:
    im = Image.open(io.BytesIO(png))
    assert im.size == (WIDTH, HEIGHT) and im.mode == "RGB" and len(png) < 1_000_000


CONCURRENT_DECODES = """
import json, sys, threading
from memetrace.decode_budget import DecodeBudget
from memetrace.imageio import DecodeLimits, decode
from memetrace.settings import Settings

s = Settings()
data = open(sys.argv[1], "rb").read()
budget, limits = DecodeBudget.from_settings(s), DecodeLimits.from_settings(s)
shapes = []
threads = [threading.Thread(target=lambda: shapes.append(decode(data, limits, budget).rgb.shape)) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"shapes": shapes, "max_side": limits.max_side, "peak_pixels": budget.peak,
                  "budget_pixels": budget.pixels}))
"""


def test_eight_concurrent_60mp_decodes_stay_under_the_api_limit(png: bytes, tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png)
    out, peak = run_measured([sys.executable, "-c", CONCURRENT_DECODES, str(path)], clean_env(), tmp_path)
    result = json.loads(out)
    print(f"\n8 concurrent 60 MP PNG decodes: peak RSS {peak / 2**20:.0f} MiB "
          f"(limit {memory_limit('serve.yaml') / 2**20:.0f} MiB), budget peak {result['peak_pixels']} px")
    assert len(result["shapes"]) == 8 and all(max(shape) <= result["max_side"] for shape in result["shapes"])
    assert result["peak_pixels"] <= result["budget_pixels"]
    assert peak < memory_limit("serve.yaml")


def test_indexing_32_images_of_60mp_stays_under_the_ingest_limit(png: bytes, tmp_path: Path) -> None:
    folder = tmp_path / "posts"
    folder.mkdir()
    at = png.index(b"tEXt") - 4
    text_end = at + 12 + struct.unpack(">I", png[at:at + 4])[0]
    for i in range(32):  # the same pixels, distinct bytes: 32 distinct images to store
        label = _chunk(b"tEXt", f"Comment\x00{i}".encode())
        (folder / f"post{i:02d}.png").write_bytes(png[:at] + label + png[text_end:])
    # more prepare threads than cores: the decode budget, not the pool, must be what bounds memory
    env = clean_env(MEMETRACE_DATA_DIR=str(tmp_path / "data"), MEMETRACE_PREPARE_THREADS="8")
    out, peak = run_measured([str(Path(sys.executable).with_name("memetrace")), "index", str(folder)], env, tmp_path)
    summary = json.loads(out)
    print(f"\nindex of 32 x 60 MP PNGs: peak RSS {peak / 2**20:.0f} MiB "
          f"(limit {memory_limit('ingest.yaml') / 2**20:.0f} MiB)")
    assert summary["new_images"] == 32 and summary["bad_inputs"] == {}, summary
    assert peak < memory_limit("ingest.yaml")


PAD_BYTES = 40_000_000  # per body: 32 of them near MEMETRACE_MAX_FILE_BYTES, as large posts are on the wire

INGEST_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[2])  # tests/: the in-memory Kafka stand-ins of test_poison
from prometheus_client import CollectorRegistry
from test_poison import AckingProducer, ListConsumer, record
from memetrace.cli.context import Context
from memetrace.feature_store import MemoryFeatureStore
from memetrace.ingest.metrics import IngestMetrics
from memetrace.ingest.worker import IngestWorker
from memetrace.occurrence_log import MemoryOccurrenceLog
from memetrace.settings import Settings
from memetrace.vector_index import MemoryVectorIndex

s = Settings()
ctx = Context(s)
posts = [json.dumps({"post_id": f"p{i}", "url": f"{sys.argv[1]}/{i}.png"}).encode() for i in range(32)]
worker = IngestWorker(s, IngestMetrics(CollectorRegistry()), embedder=ctx.embedder, extractor=ctx.extractor,
                      index=MemoryVectorIndex(ctx.embedder.dim), occurrences=MemoryOccurrenceLog(),
                      features=MemoryFeatureStore(), producer=AckingProducer(),
                      consumer=ListConsumer([record(i, p, topic=s.kafka_posts_topic) for i, p in enumerate(posts)]))
worker.run(max_idle=1)
print(json.dumps(worker.totals.as_dict()))
"""


@pytest.fixture(scope="module")
def big_post_server(png: bytes):
    """GET /<i>.png: the 60 MP PNG with label ``i`` and a PAD_BYTES ancillary chunk (decoders skip
    it): 32 distinct images of 40 MB each on the wire, made per request from one shared pad."""
    at = png.index(b"tEXt") - 4
    head, tail = png[:at], png[at + 12 + struct.unpack(">I", png[at:at + 4])[0]:]
    pad = _chunk(b"pdAt", bytes(PAD_BYTES))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            label = _chunk(b"tEXt", f"Comment\x00{self.path}".encode())
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(head) + len(label) + len(pad) + len(tail)))
            self.end_headers()
            for part in (head, label, pad, tail):
                self.wfile.write(part)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_ingest_worker_on_32_posts_of_60mp_stays_under_the_ingest_limit(big_post_server: str,
                                                                             tmp_path: Path) -> None:
    """The worker's own code path (download window, indexer, decode budget) on 32 posts of 40 MB,
    60 MP PNGs, with the Kafka consumer and the stores in memory."""
    env = clean_env(MEMETRACE_DATA_DIR=str(tmp_path / "data"), MEMETRACE_FETCH_ALLOW_PRIVATE_NETWORKS="1",
                    MEMETRACE_DEVICE="cpu", MEMETRACE_METRICS_PORT="0", MEMETRACE_PREPARE_THREADS="8",
                    MEMETRACE_INGEST_BATCH_SIZE="32")
    out, peak = run_measured([sys.executable, "-c", INGEST_WORKER, big_post_server, str(REPO / "tests")], env,
                             tmp_path)
    totals = json.loads(out.strip().splitlines()[-1])
    print(f"\ningest worker, 32 posts of 60 MP PNG ({PAD_BYTES / 1e6:.0f} MB each): peak RSS {peak / 2**20:.0f} MiB "
          f"(limit {memory_limit('ingest.yaml') / 2**20:.0f} MiB)")
    assert totals["new_images"] == 32 and totals["deadlettered"] == {}, totals
    assert peak < memory_limit("ingest.yaml")
