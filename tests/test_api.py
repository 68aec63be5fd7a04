"""The query API over real sockets: a small corpus indexed with ``run_index`` (Milvus Lite, local
feature store), served by uvicorn on 127.0.0.1, called with urllib.

Two servers share the stored data: ``main`` requires a token and may download from loopback (the
local HTTP server); ``strict`` has no token, the SSRF guard on, and a tiny upload limit.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from PIL import Image, ImageOps
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from memetrace.api.app import create_app
from memetrace.api.errors import ApiError
from memetrace.api.limits import SearchPool
from memetrace.api.schemas import (ClusterDetail, ClusterList, ErrorBody, Health, ImageResponse, Ready,
                                   SearchResponse)
from memetrace.api.search import BODY_SLACK
from memetrace.api.server import bind, server_for
from memetrace.cli.batch import run_index
from memetrace.cli.context import Context
from memetrace.imageio import content_id
from memetrace.models import ImageRecord
from memetrace.settings import Settings
from memetrace.vector_index import MemoryVectorIndex
from tests.conftest import load_photo, make_settings

TOKEN = "s3cret-token"
SMALL_UPLOAD = 20_000  # strict server: bigger uploads are refused


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _corpus(folder: Path) -> dict[str, bytes]:
    """Astronaut: original, crop, recompressed (a cluster of 3); cat and its mirror (2); 2 singletons."""
    folder.mkdir()
    astronaut, cat = load_photo("astronaut"), load_photo("cat")
    w, h = astronaut.size
    files = {"astronaut.jpg": _jpeg(astronaut, 90),
             "astronaut_crop.jpg": _jpeg(astronaut.crop((w // 8, h // 16, w // 2 + w // 8, h // 2 + h // 16)), 90),
             "astronaut_q35.jpg": _jpeg(astronaut, 35),
             "cat.jpg": _jpeg(cat, 90), "cat_mirror.jpg": _jpeg(ImageOps.mirror(cat), 85),
             "coffee.jpg": _jpeg(load_photo("coffee"), 90), "hubble.jpg": _jpeg(load_photo("hubble"), 90)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        assert self.headers.get_content_type() == "application/json", (self.status, self.body[:200])
        return json.loads(self.body)


def _multipart(data: bytes, field_name: str = "image") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="query.jpg"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None  # the test looks at the redirect itself


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass
class Api:
    base: str
    token: str | None
    ctx: Context
    app: FastAPI

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             auth: bool = True) -> Reply:
        hdrs = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        req = urllib.request.Request(self.base + path, data=body, method=method, headers={**hdrs, **(headers or {})})
        try:
            with _OPENER.open(req, timeout=60) as resp:
                return Reply(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return Reply(err.code, err.headers, err.read())

    def get(self, path: str, **kw: Any) -> Reply:
        return self.call("GET", path, **kw)

    def upload(self, data: bytes, field_name: str = "image", **kw: Any) -> Reply:
        body, content_type = _multipart(data, field_name)
        return self.call("POST", "/v1/search", body, {"Content-Type": content_type}, **kw)

    def search_url(self, url: str, **kw: Any) -> Reply:
        return self.call("POST", "/v1/search", json.dumps({"url": url}).encode(),
                         {"Content-Type": "application/json"}, **kw)


def _raw_request(api: Api, request_line: str, headers: dict[str, str], body: bytes) -> socket.socket:
    """A socket that sent ``request_line``, ``headers`` and ``body`` as they are: bodies urllib cannot send."""
    base = urllib.parse.urlsplit(api.base)
    sock = socket.create_connection((base.hostname, base.port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "api", **headers}.items())
    sock.sendall(f"{request_line} HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def _api_context(settings: Settings, indexed: Context) -> Context:
    """A Context sharing the indexing run's model and stores (one Milvus Lite file has one owner)."""
    ctx = Context(settings)
    ctx.embedder, ctx.features = indexed.embedder, indexed.features
    ctx.index, ctx.occurrences, ctx.board = indexed.index, indexed.occurrences, indexed.board
    return ctx


def _serve(ctx: Context) -> Iterator[Api]:
    sock = bind("127.0.0.1", 0)
    app = create_app(ctx)
    server = server_for(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    api = Api(f"http://127.0.0.1:{sock.getsockname()[1]}", TOKEN if ctx.settings.api_token else None, ctx, app)
    deadline = time.monotonic() + 60
    while api.get("/readyz").status != 200:
        assert time.monotonic() < deadline, api.get("/readyz").body
        time.sleep(0.05)
    try:
        yield api
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@dataclass
class Corpus:
    folder: Path
    files: dict[str, bytes]
    images_url: str  # the local HTTP server serving the folder

    def id_of(self, name: str) -> int:
        return content_id(self.files[name])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    folder = tmp_path_factory.mktemp("api") / "images"
    files = _corpus(folder)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield Corpus(folder, files, f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def indexed(corpus: Corpus, embedder) -> Context:
    ctx = Context(make_settings(corpus.folder.parent / "data"))
    ctx.embedder = embedder
    posts = corpus.folder.parent / "posts.csv"  # a post of one singleton, with two extra columns (its meta)
    posts.write_text("path,post_id,posted_at,platform,author,likes,caption,,likes\n"
                     f"images/coffee.jpg,c1,2026-01-05T10:00:00Z,reddit,@ana,12,{CAPTION},x,99\n")
    summary = run_index(ctx, corpus.folder, posts)
    assert summary["new_images"] == 7 and summary["clusters"] == 2, summary
    assert summary["posts"]["recorded"] == 1 and summary["posts"]["ignored_columns"] == ["(no name) (column 8)",
                                                                                      "likes (column 9)"]
    return ctx


@pytest.fixture(scope="module")
def main(indexed: Context) -> Iterator[Api]:
    settings = indexed.settings.model_copy(update={"api_token": SecretStr(TOKEN), "fetch_allow_private_networks": True})
    yield from _serve(_api_context(settings, indexed))


@pytest.fixture(scope="module")
def strict(indexed: Context) -> Iterator[Api]:
    settings = indexed.settings.model_copy(update={"api_max_upload_bytes": SMALL_UPLOAD})
    yield from _serve(_api_context(settings, indexed))


def _error(reply: Reply, status: int, error: str) -> dict:
    assert reply.status == status, (reply.status, reply.body[:300])
    body = reply.json()
    assert body["error"] == error and body["detail"], body
    ErrorBody.model_validate(body)
    return body


# ------------------------------------------------------------------------------------------ search


def test_search_upload_finds_the_copies_with_their_cluster(main: Api, corpus: Corpus) -> None:
    query = _jpeg(load_photo("astronaut"), 60)  # a copy nobody stored
    reply = main.upload(query)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["query"] == {"image_id": content_id(query), "width": 480, "height": 480, "stored": False}
    matches = body["matches"]
    assert {m["image_id"] for m in matches} == {corpus.id_of(n) for n in
                                                ("astronaut.jpg", "astronaut_crop.jpg", "astronaut_q35.jpg")}
    assert [m["inliers"] for m in matches] == sorted((m["inliers"] for m in matches), reverse=True)
    assert len({m["cluster_id"] for m in matches}) == 1 and matches[0]["cluster_id"] is not None
    by_path = {Path(m["path"]).name: m for m in matches}
    assert by_path["astronaut_crop.jpg"]["kind"] == "partial" and by_path["astronaut.jpg"]["kind"] == "full"
    assert all(m["inliers"] >= 10 and m["posts"] == [] and m["posts_total"] == 0 for m in matches)


def test_search_gives_each_match_its_boxes_and_explain_draws_the_pair(main: Api, corpus: Corpus) -> None:
    body = main.upload(corpus.files["astronaut_crop.jpg"]).json()
    g = {Path(m["path"]).name: m["geometry"] for m in body["matches"]}["astronaut.jpg"]
    assert all(abs(v - e) <= 6 for v, e in zip(g["box_match"], (60, 30, 300, 270))), g  # where it was cut
    assert g["box_query"] == [0, 0, 240, 240] and abs(g["scale"] - 1) < 0.02 and not g["mirrored"], g
    reply = main.get(f"/v1/explain?a={corpus.id_of('astronaut_crop.jpg')}&b={corpus.id_of('astronaut.jpg')}")
    assert reply.status == 200 and reply.headers.get_content_type() == "image/png", reply.body[:200]
    assert reply.headers["X-Memetrace-Match"] == "true" and Image.open(io.BytesIO(reply.body)).size == (960, 508)
    reply = main.get(f"/v1/explain?a={corpus.id_of('coffee.jpg')}&b={corpus.id_of('hubble.jpg')}")
    assert reply.status == 200 and reply.headers["X-Memetrace-Match"] == "false"
    _error(main.get(f"/v1/explain?a=1&b={corpus.id_of('coffee.jpg')}"), 404, "unknown_image")
    page = main.get("/gallery").body.decode()
    link = re.search(r'href="(v1/explain\?a=\d+&amp;b=\d+)"', page)
    assert link, page[-2000:]
    reply = main.get("/" + link.group(1).replace("&amp;", "&"))
    assert reply.status == 200 and reply.headers["X-Memetrace-Match"] == "true"  # the cards hold copies


def test_search_a_stored_image_is_identical_to_itself(main: Api, corpus: Corpus) -> None:
    body = main.upload(corpus.files["cat_mirror.jpg"]).json()
    assert body["query"]["stored"] is True
    kinds = {m["image_id"]: (m["kind"], m["mirrored"]) for m in body["matches"]}
    assert kinds == {corpus.id_of("cat_mirror.jpg"): ("identical", False), corpus.id_of("cat.jpg"): ("full", True)}


def test_copies_of_a_stored_image_are_what_its_upload_finds(main: Api, corpus: Corpus) -> None:
    uploaded = main.upload(corpus.files["cat_mirror.jpg"]).json()
    reply = main.get(f"/v1/images/{corpus.id_of('cat_mirror.jpg')}/copies")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["query"] == {**uploaded["query"], "stored": True}
    assert body["matches"] == [m for m in uploaded["matches"] if m["kind"] != "identical"]
    assert [(m["kind"], m["mirrored"]) for m in body["matches"]] == [("full", True)]
    _error(main.get("/v1/images/1/copies"), 404, "unknown_image")


def test_a_stored_image_without_keypoints_says_so(main: Api, corpus: Corpus) -> None:
    image_id, features = corpus.id_of("hubble.jpg"), main.ctx.features
    kp = features.get_keypoints(image_id)
    features.delete(features.keypoints_key(image_id))
    try:
        assert main.get(f"/v1/images/{image_id}").status == 200
        body = _error(main.get(f"/v1/images/{image_id}/copies"), 409, "features_missing")
        assert str(image_id) in body["detail"] and "index its file again" in body["detail"]
        _error(main.get(f"/v1/explain?a={image_id}&b={corpus.id_of('cat.jpg')}"), 409, "features_missing")
    finally:
        features.put_keypoints(image_id, kp)
    assert main.get(f"/v1/images/{image_id}/copies").status == 200


def test_search_by_url_through_the_fetcher(main: Api, corpus: Corpus) -> None:
    reply = main.search_url(f"{corpus.images_url}/astronaut_crop.jpg")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["query"]["image_id"] == corpus.id_of("astronaut_crop.jpg") and body["query"]["stored"]
    assert body["matches"][0]["kind"] == "identical" and len(body["matches"]) == 3


def test_search_by_url_refused_by_the_ssrf_guard(strict: Api, corpus: Corpus) -> None:
    body = _error(strict.search_url(f"{corpus.images_url}/astronaut.jpg"), 422, "download_failed")
    assert body["reason"] == "private_address"
    assert "127.0.0.1 is a loopback address, not a public address" in body["detail"]


def test_search_by_url_that_fails(main: Api, corpus: Corpus) -> None:
    assert _error(main.search_url(f"{corpus.images_url}/missing.jpg"), 422, "download_failed")["reason"] == "http_404"
    assert _error(main.search_url("file:///etc/passwd"), 422, "download_failed")["reason"] == "bad_url"


def test_stalled_downloads_leave_the_other_endpoints_alone(main: Api) -> None:
    """URL searches stuck on a server that does not answer keep to their own threads: the rest of the API
    (whose sync endpoints and auth checks run on anyio's shared pool of 40 threads) still answers."""
    release = threading.Event()

    class Stall(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            release.wait(20)
            self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    stalling = ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    threading.Thread(target=stalling.serve_forever, daemon=True).start()
    n = 45  # more than the shared pool
    with ThreadPoolExecutor(n) as pool:
        stuck = [pool.submit(main.search_url, f"http://127.0.0.1:{stalling.server_address[1]}/{i}.jpg")
                 for i in range(n)]
        try:
            time.sleep(1)  # all of them reach the fetcher
            started = time.monotonic()
            assert main.get("/v1/clusters").status == 200
            assert time.monotonic() - started < 5
        finally:
            release.set()
        assert {f.result().json()["reason"] for f in stuck} == {"http_404"}
    stalling.shutdown()
    stalling.server_close()


@pytest.mark.parametrize(("body", "headers", "status", "error"), [
    (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
    (b"", {"Content-Type": "application/json"}, 400, "invalid_json"),
    (b'{"uri": "http://x"}', {"Content-Type": "application/json"}, 422, "invalid_request"),
    (b'{"url": 3}', {"Content-Type": "application/json"}, 422, "invalid_request"),
    (b"[]", {"Content-Type": "application/json"}, 422, "invalid_request"),
    (b"hello", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (b"hello", {}, 415, "unsupported_media_type"),
    (b"--x\r\n", {"Content-Type": "multipart/form-data"}, 400, "bad_request"),  # no boundary
])
def test_search_bad_requests(main: Api, body: bytes, headers: dict[str, str], status: int, error: str) -> None:
    _error(main.call("POST", "/v1/search", body, headers), status, error)


def test_search_bad_uploads(main: Api, strict: Api, corpus: Corpus) -> None:
    assert "no supported image format" in _error(main.upload(b"GIF? no: plain text"), 422, "not_an_image")["detail"]
    _error(main.upload(corpus.files["cat.jpg"][:2000]), 422, "corrupt")
    _error(main.upload(_jpeg(Image.new("RGB", (20, 20)), 90)), 422, "too_small")
    _error(main.upload(b""), 400, "empty")
    assert "-F image=@" in _error(main.upload(corpus.files["cat.jpg"], field_name="file"), 422,
                                  "missing_image")["detail"]
    big = corpus.files["coffee.jpg"]
    assert len(big) > SMALL_UPLOAD
    assert "MEMETRACE_API_MAX_UPLOAD_BYTES=20000" in _error(strict.upload(big), 413, "too_large")["detail"]


def test_chunked_upload_refused_while_it_arrives(strict: Api) -> None:
    """No Content-Length: the body is counted as it arrives, so a 413 comes before its end (here: never)."""
    body, content_type = _multipart(b"\xff\xd8\xff" + bytes(SMALL_UPLOAD + BODY_SLACK))
    with _raw_request(strict, "POST /v1/search", {"Content-Type": content_type, "Transfer-Encoding": "chunked"},
                      f"{len(body):x}\r\n".encode() + body + b"\r\n") as sock:  # and never the last chunk
        assert sock.makefile("rb").readline().split()[1] == b"413"


# ------------------------------------------------------------------------------------- images, clusters


def test_image_and_thumbnail(main: Api, corpus: Corpus) -> None:
    image_id = corpus.id_of("astronaut_crop.jpg")
    body = main.get(f"/v1/images/{image_id}").json()
    assert Path(body["path"]) == corpus.folder / "astronaut_crop.jpg"
    assert body["image_id"] == image_id and body["cluster_id"] is not None and body["nb_points"] > 10
    assert (body["width"], body["height"]) == Image.open(corpus.folder / "astronaut_crop.jpg").size
    assert body["posts"] == [] and body["posts_total"] == 0
    assert body["thumbnail"] == f"/v1/images/{image_id}/thumbnail"
    thumb = main.get(body["thumbnail"])
    assert thumb.status == 200 and thumb.headers["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.body)).size) <= 160
    _error(main.get("/v1/images/12345"), 404, "unknown_image")
    _error(main.get("/v1/images/12345/thumbnail"), 404, "no_thumbnail")
    _error(main.get("/v1/images/abc"), 422, "invalid_request")
    _error(main.get(f"/v1/images/{2**64}"), 422, "invalid_request")


CAPTION = "when the coffee kicks in ☕"


def test_a_posts_csv_s_extra_columns_are_the_stored_posts_meta(main: Api, corpus: Corpus) -> None:
    image_id = corpus.id_of("coffee.jpg")
    (stored,) = main.ctx.occurrences.occurrences_of([image_id])
    assert stored.meta == {"likes": "12", "caption": CAPTION}  # the first "likes"; the unnamed column left out
    body = main.get(f"/v1/images/{image_id}").json()
    assert body["posts_total"] == 1 and body["posts"] == [{
        "image_id": image_id, "post_id": "c1", "url": str(corpus.folder / "coffee.jpg"), "platform": "reddit",
        "posted_at": 1767607200, "meta": {"likes": "12", "caption": CAPTION}}]
    ImageResponse.model_validate(body)


def test_clusters_in_each_order(main: Api, corpus: Corpus) -> None:
    by_size = main.get("/v1/clusters?sort=size").json()
    assert by_size["total"] == 2 and [c["images"] for c in by_size["clusters"]] == [3, 2]
    first = by_size["clusters"][0]
    assert first["posts"] == 3 and first["platforms"] == {"file": 3} and first["growth_hour"] == 3
    assert first["first_seen"] <= first["last_seen"] <= time.time()
    for sort in ("growth", "recent"):
        body = main.get(f"/v1/clusters?sort={sort}").json()
        assert body["sort"] == sort and {c["cluster_id"] for c in body["clusters"]} == \
               {c["cluster_id"] for c in by_size["clusters"]}
    assert main.get("/v1/clusters?sort=growth").json()["clusters"][0]["images"] == 3  # 3 posts in the last hour
    assert main.get("/v1/clusters?limit=1&offset=1").json()["clusters"] == by_size["clusters"][1:]
    detail = _error(main.get("/v1/clusters?sort=biggest"), 422, "invalid_request")["detail"]
    assert "query.sort" in detail and "'size', 'growth' or 'recent'" in detail
    _error(main.get("/v1/clusters?limit=0"), 422, "invalid_request")


def test_cluster_detail(main: Api, corpus: Corpus) -> None:
    cluster_id = main.get(f"/v1/images/{corpus.id_of('cat.jpg')}").json()["cluster_id"]
    body = main.get(f"/v1/clusters/{cluster_id}").json()
    assert body["cluster_id"] == cluster_id and body["images"] == 2 and body["members_total"] == 2
    assert {Path(m["path"]).name for m in body["members"]} == {"cat.jpg", "cat_mirror.jpg"}
    assert all(m["thumbnail"] == f"/v1/images/{m['image_id']}/thumbnail" for m in body["members"])
    assert [e["event"] for e in body["history"]] == ["created"]
    assert body["timeline"] == [] and body["timeline_total"] == 0
    _error(main.get("/v1/clusters/987654321"), 404, "unknown_cluster")


def test_cluster_tree(main: Api, corpus: Corpus) -> None:
    cluster_id = main.get(f"/v1/images/{corpus.id_of('cat.jpg')}").json()["cluster_id"]
    body = main.get(f"/v1/clusters/{cluster_id}/tree").json()
    assert body["cluster_id"] == cluster_id and body["nodes_total"] == 2
    assert {Path(n["path"]).name for n in body["nodes"]} == {"cat.jpg", "cat_mirror.jpg"}
    root, copy = body["nodes"]
    assert root["parent"] is None and copy["parent"] == root["image_id"]
    assert body["edges"] == [{"parent": root["image_id"], "child": copy["image_id"], "edit": "mirror",
                              "confidence": copy["confidence"]}]
    _error(main.get("/v1/clusters/987654321/tree"), 404, "unknown_tree")


# ------------------------------------------------------------------------------------------ gallery


def test_gallery_with_the_token_cookie(main: Api, corpus: Corpus) -> None:
    assert main.get("/", auth=False).headers["Location"] == "gallery"
    _error(main.get("/gallery", auth=False), 401, "unauthorized")
    assert main.get("/gallery").status == 200  # the header works too
    _error(main.get("/gallery?token=wrong", auth=False), 401, "unauthorized")
    login = main.get(f"/gallery?sort=growth&token={TOKEN}", auth=False)
    assert login.status == 303 and login.headers["Location"] == "gallery?sort=growth"
    cookie = login.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    jar = {"Cookie": cookie.split(";")[0]}
    page = main.get("/gallery", auth=False, headers=jar)
    assert page.status == 200 and page.headers.get_content_type() == "text/html"
    assert "img-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.body.decode()
    thumbs = re.findall(r'<img src="v1/images/(\d+)/thumbnail"', html)
    assert sorted(map(int, thumbs)) == sorted(corpus.id_of(n) for n in corpus.files if "astronaut" in n or "cat" in n)
    assert "<b>2</b> clusters shown" in html and "platforms: <b>file 3</b>" in html
    assert html.index("astronaut") < html.index("cat.jpg")  # biggest first
    assert main.get(f"/v1/images/{thumbs[0]}/thumbnail", auth=False, headers=jar).status == 200  # <img> works
    # the cookie is for reading: a search needs the header
    _error(main.call("POST", "/v1/search", b"{}", {"Content-Type": "application/json", **jar}, auth=False), 401,
           "unauthorized")


def test_gallery_without_token(strict: Api) -> None:
    page = strict.get("/gallery?sort=recent&limit=1")
    assert page.status == 200 and "<b>1</b> of 2 clusters shown" in page.body.decode()
    _error(strict.get("/gallery?sort=nope"), 422, "invalid_request")


# ---------------------------------------------------------------------------------- auth, operations


def test_token_required_on_v1_only(main: Api, corpus: Corpus) -> None:
    path = f"/v1/images/{corpus.id_of('cat.jpg')}"
    missing = _error(main.get(path, auth=False), 401, "unauthorized")
    assert "Authorization: Bearer" in missing["detail"]
    assert main.get(path, auth=False).headers["WWW-Authenticate"] == "Bearer"
    _error(main.get(path, auth=False, headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
    _error(main.get(path, auth=False, headers={"Authorization": f"Basic {TOKEN}"}), 401, "unauthorized")
    _error(main.upload(b"x", auth=False), 401, "unauthorized")
    assert main.get(path).status == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert main.get(open_path, auth=False).status == 200, open_path


def test_operations_and_unknown_routes(main: Api) -> None:
    assert main.get("/healthz").json() == {"status": "ok"}
    assert main.get("/readyz").json() == {"status": "ready"}
    assert "/v1/search" in main.get("/openapi.json").json()["paths"]
    assert "/docs" in _error(main.get("/v2/nothing"), 404, "not_found")["detail"]
    _error(main.call("DELETE", "/v1/search"), 405, "method_not_allowed")


def _metrics(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(api.get("/metrics").body.decode()) for s in family.samples}


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_by_route_template(main: Api, corpus: Corpus) -> None:
    main.get(f"/v1/images/{corpus.id_of('hubble.jpg')}")
    main.upload(corpus.files["coffee.jpg"])
    main.get(f"/v1/images/{corpus.id_of('coffee.jpg')}/copies")
    main.get("/docs")
    samples = _metrics(main)
    requests = "memetrace_api_requests_total"
    assert _value(samples, requests, route="/v1/images/{image_id}", method="GET", status="200") >= 1
    assert _value(samples, requests, route="/v1/search", method="POST", status="200") >= 1
    assert _value(samples, requests, route="/docs", method="GET", status="200") >= 1  # a Starlette route
    assert _value(samples, requests, route="unmatched", method="GET", status="404") >= 1
    assert _value(samples, requests, route="unmatched", method="GET", status="200") == 0
    assert _value(samples, "memetrace_api_request_seconds_count", route="/readyz") >= 1
    assert _value(samples, "memetrace_search_seconds_count", query="upload") >= 1
    assert _value(samples, "memetrace_search_seconds_count", query="stored") >= 1
    routes = {dict(labels).get("route") for name, labels in samples if name == requests}
    assert not any(str(corpus.id_of("hubble.jpg")) in r for r in routes)  # raw paths never become labels


def test_aborted_upload_is_no_server_error(main: Api, caplog: pytest.LogCaptureFixture) -> None:
    """A client hanging up mid-upload is counted as 499 (client closed), not logged and counted as a 500."""
    body, content_type = _multipart(bytes(100_000))
    labels = {"route": "/v1/search", "method": "POST"}
    with caplog.at_level(logging.ERROR, logger="memetrace.api.middleware"):
        with _raw_request(main, "POST /v1/search", {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type,
                                                    "Content-Length": str(len(body))}, body[:1000]):
            time.sleep(0.2)  # the handler is waiting for the rest of the body
        deadline = time.monotonic() + 10
        while not _value(samples := _metrics(main), "memetrace_api_requests_total", status="499", **labels):
            assert time.monotonic() < deadline, "the aborted upload was not counted as 499"
            time.sleep(0.05)
    assert _value(samples, "memetrace_api_requests_total", status="500", **labels) == 0
    assert not [r for r in caplog.records if r.name == "memetrace.api.middleware"]


class _BurningIndex(MemoryVectorIndex):
    def get(self, image_ids: Sequence[int]) -> dict[int, ImageRecord]:
        raise RuntimeError("disk on fire")


@pytest.fixture(scope="module")
def burning(indexed: Context) -> Iterator[Api]:
    """A server whose vector index fails every lookup with an unexpected error."""
    ctx = _api_context(indexed.settings, indexed)
    ctx.index = _BurningIndex(indexed.embedder.dim)
    yield from _serve(ctx)


def test_unexpected_error_is_a_logged_json_500(burning: Api, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="memetrace.api.middleware"):
        body = _error(burning.get("/v1/images/1"), 500, "internal_error")
    assert "disk on fire" not in body["detail"]  # internals stay in the log
    record = next(r for r in caplog.records if r.name == "memetrace.api.middleware")
    assert record.exc_info and "disk on fire" in str(record.exc_info[1]) and record.path == "/v1/images/1"


def test_api_never_opened_the_catalog(main: Api, strict: Api) -> None:
    """API replicas have no SQLite store (batch catalog, clusterer state): everything comes from Milvus and
    the feature store."""
    assert not {"catalog", "graph_state"} & (vars(main.ctx).keys() | vars(strict.ctx).keys())


# ------------------------------------------------------------------------------- response models


MEDIA_TYPES = {"/v1/images/{image_id}/thumbnail": "image/jpeg", "/v1/images/{image_id}/file": "image/",
               "/v1/explain": "image/png",
               "/gallery": "text/html", "/metrics": "text/plain"}


def test_openapi_describes_every_response(main: Api) -> None:
    """Every route's 200 is a component schema (or, for the binary and text routes, its media type),
    and every error it declares is the ErrorBody."""
    paths = main.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/v1/search", "/v1/images/{image_id}", "/v1/images/{image_id}/copies",
                          "/v1/images/{image_id}/thumbnail",
                          "/v1/images/{image_id}/file", "/v1/explain", "/v1/clusters",
                          "/v1/clusters/{cluster_id}", "/v1/clusters/{cluster_id}/tree", "/gallery", "/healthz", "/readyz", "/metrics"}
    for path, operations in paths.items():
        for method, op in operations.items():
            responses = op["responses"]
            ok = responses["200"]["content"]
            if path in MEDIA_TYPES:
                assert [t for t in ok if t.startswith(MEDIA_TYPES[path])], (method, path, ok)
            else:
                assert list(ok) == ["application/json"], (method, path, ok)
                assert ok["application/json"]["schema"]["$ref"].startswith("#/components/schemas/"), (method, path)
            errors = {status: r for status, r in responses.items() if status[0] in "45"}
            assert "500" in errors and (path in ("/healthz", "/metrics") or "503" in errors), (method, path)
            for status, r in errors.items():
                assert r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, \
                    (method, path, status)


def test_responses_validate_against_their_models(main: Api, corpus: Corpus) -> None:
    """Each route's JSON is exactly its model (the models forbid fields they do not declare)."""
    found = SearchResponse.model_validate_json(main.upload(corpus.files["astronaut.jpg"]).body)
    image = ImageResponse.model_validate_json(main.get(f"/v1/images/{found.matches[0].image_id}").body)
    listed = ClusterList.model_validate_json(main.get("/v1/clusters").body)
    detail = ClusterDetail.model_validate_json(main.get(f"/v1/clusters/{image.cluster_id}").body)
    assert image.cluster_id == found.matches[0].cluster_id == detail.cluster_id
    assert detail.cluster_id in {c.cluster_id for c in listed.clusters}
    assert [e.event for e in detail.history] == ["created"]
    Health.model_validate_json(main.get("/healthz").body)
    Ready.model_validate_json(main.get("/readyz").body)


def test_search_pool_refuses_beyond_its_queue() -> None:
    """1 search running and 1 waiting: a third is refused at once with 503 busy and Retry-After; once
    they give their places back, searches are accepted again."""
    release = threading.Event()
    started = threading.Event()

    def blocked() -> str:
        started.set()
        release.wait(10)
        return "done"

    async def scenario(pool: SearchPool) -> list[str]:
        results: list[str] = []

        async def run(fn: Any) -> None:
            with pool.place() as place:
                place.take()
                results.append(await pool.run(fn))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, blocked)
            tg.start_soon(run, blocked)
            await anyio.to_thread.run_sync(started.wait, 10)
            with pytest.raises(ApiError) as refused, pool.place() as place:
                place.take()
            assert refused.value.status == 503 and refused.value.error == "busy"
            assert int((refused.value.headers or {})["Retry-After"]) > 0
            release.set()
        await run(lambda: "again")
        return results

    pool = SearchPool(threads=1, queue=1)
    assert anyio.run(scenario, pool) == ["done", "done", "again"]
    assert (pool.held, pool.refused) == (0, 1)


NARROW_ROOM = 2  # 1 search thread + 1 place in the queue
SLOW_UPLOADS = 8


@pytest.fixture(scope="module")
def narrow(indexed: Context) -> Iterator[Api]:
    """A server with room for NARROW_ROOM searches (MEMETRACE_API_SEARCH_CONCURRENCY + _QUEUE)."""
    settings = indexed.settings.model_copy(update={"api_search_concurrency": 1, "api_search_queue": NARROW_ROOM - 1})
    yield from _serve(_api_context(settings, indexed))


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_slow_uploads_hold_at_most_the_pools_room(narrow: Api, corpus: Corpus) -> None:
    """SLOW_UPLOADS uploads send half their body and wait: only NARROW_ROOM take a place in the search
    pool (and so may be read and held); the others are refused busy before any of their body is
    parsed, and answered 503 once they have sent it."""
    body, content_type = _multipart(corpus.files["astronaut.jpg"])
    pool: SearchPool = narrow.app.state.searches
    refused_before = pool.refused
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close"}
    socks = [_raw_request(narrow, "POST /v1/search", headers, body[:len(body) // 2]) for _ in range(SLOW_UPLOADS)]
    try:
        _wait_for(lambda: pool.refused - refused_before == SLOW_UPLOADS - NARROW_ROOM,
                  f"{SLOW_UPLOADS - NARROW_ROOM} uploads were not refused busy while their bodies arrived")
        assert pool.held == NARROW_ROOM
        for sock in socks:
            sock.sendall(body[len(body) // 2:])
        replies = [sock.makefile("rb").read().partition(b"\r\n\r\n") for sock in socks]  # the server closes
    finally:
        for sock in socks:
            sock.close()
    statuses = sorted(int(head.split()[1]) for head, _, _ in replies)
    assert statuses == [200] * NARROW_ROOM + [503] * (SLOW_UPLOADS - NARROW_ROOM), statuses
    assert {ErrorBody.model_validate_json(rest).error for head, _, rest in replies if b" 503 " in head} == {"busy"}
    _wait_for(lambda: pool.held == 0, "places were not given back")


IMPATIENT_S = 0.5


@pytest.fixture(scope="module")
def impatient(indexed: Context) -> Iterator[Api]:
    """A server whose request heads and bodies must arrive within IMPATIENT_S (MEMETRACE_API_HEADER_TIMEOUT_S,
    MEMETRACE_API_BODY_TIMEOUT_S)."""
    settings = indexed.settings.model_copy(update={"api_header_timeout_s": IMPATIENT_S,
                                                   "api_body_timeout_s": IMPATIENT_S})
    yield from _serve(_api_context(settings, indexed))


def test_stalled_body_is_cut_with_408(impatient: Api) -> None:
    """Headers, then half the body, then nothing: 408 after MEMETRACE_API_BODY_TIMEOUT_S, connection closed."""
    body, content_type = _multipart(bytes(10_000))
    started = time.monotonic()
    with _raw_request(impatient, "POST /v1/search", {"Content-Type": content_type,
                                                     "Content-Length": str(len(body))}, body[:5_000]) as sock:
        reply = sock.makefile("rb").read()  # to the end: the server closes the connection
    assert IMPATIENT_S <= time.monotonic() - started < 5
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split()[1] == b"408", reply[:300]
    assert ErrorBody.model_validate_json(rest.partition(b"\r\n\r\n")[2]).error == "body_timeout"


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: a",
                                  b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /he"])
def test_stalled_request_head_is_closed(impatient: Api, sent: bytes) -> None:
    """Nothing, half a head, or half the next head after a keep-alive answer: closed after the deadline."""
    base = urllib.parse.urlsplit(impatient.base)
    started = time.monotonic()
    with socket.create_connection((base.hostname, base.port), timeout=10) as sock:
        sock.sendall(sent)
        reply = sock.makefile("rb").read()  # returns when the server closes
    assert IMPATIENT_S <= time.monotonic() - started < 5
    assert reply.count(b"HTTP/1.1 200") == sent.count(b"\r\n\r\n"), reply
