"""The Milvus backends of the vector index, the occurrence log and the cluster board.

The same code talks to Milvus Lite (a file URI, the embedded default) and to a Milvus server
(``http://host:19530``); the three backends share one client (:func:`connect`).
Occurrences, dead letters and the cluster board stay in Milvus: it is the one shared service every
deployment already runs (one fewer to operate); their interfaces let a relational backend come later.

Failures: every backend method turns a transient client failure into
``DependencyDown("milvus", ...)``, after loading again a collection Milvus reports not loaded
(a restarted Milvus Lite serves them released), so the caller's retry succeeds. A write Milvus
refuses as malformed (a value the schema cannot hold) is refused for good: ``Refused("milvus", ...)``,
which the consume loop dead-letters instead of retrying; a malformed read (a bad filter) is a bug:
raised as is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import (DataNotMatchException, DataTypeNotMatchException, MilvusException, ParamError,
                                 PrimaryKeyException)

from memetrace.cluster_board import HISTORY_BYTES, PLATFORMS_BYTES, ClusterBoard, fitted_summary
from memetrace.errors import ConfigError, DependencyDown, Refused
from memetrace.models import ClusterSummary, DeadLetterRow, ImageRecord, ImageRow, OccurrenceRow
from memetrace.messages import META_BYTES
from memetrace.occurrence_log import DEAD_LETTER_BYTES, OCCURRENCE_BYTES, OccurrenceLog, fitted_occurrence
from memetrace.parallel import concurrently
from memetrace.settings import Settings
from memetrace.varchar import fitted, json_text
from memetrace.vector_index import IMAGE_BYTES, Hits, VectorIndex, now_ms

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Milvus Lite gives query iterators no MVCC timestamp: pymilvus then warns on stderr, outside our
# JSON logs, at every iterator (`stats` printed it), and uses the client's clock, which is fine here
logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(lambda r: "mvccTs" not in r.getMessage())

STRONG = "Strong"

# Milvus refuses a collection without a vector field, and loads none whose vector is not indexed;
# the occurrence, dead-letter and cluster tables are plain records (looked up by primary key,
# counted, filtered by a field), so each row carries this constant 2-d vector (the smallest a
# FLOAT_VECTOR may be) under a FLAT index: stored in every row, never searched.
DUMMY_VECTOR = [0.0, 0.0]
_UPSERT_CHUNK = 1000  # rows per upsert of a bulk write


@dataclass(frozen=True)
class MilvusConfig:
    """Where Milvus is and how its collections are named and indexed (``MEMETRACE_MILVUS_*``)."""

    uri: str  # a Milvus Lite file, or http://host:19530
    token: str = ""
    collection_prefix: str = "memetrace"
    index_type: str = "FLAT"
    metric: str = "IP"
    ivf_nlist: int = 128  # IVF_FLAT / IVF_SQ8 only
    ivf_nprobe: int = 16
    # every read's but a migration's: the workers read what they just wrote (Strong); the API reads
    # nothing it wrote (its only writes: creating missing collections, migrating the occurrence log)
    # and need not wait for the server's time tick (MEMETRACE_API_READ_CONSISTENCY)
    read_consistency: str = STRONG

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(uri=s.resolved_milvus_uri(), token=s.milvus_token, collection_prefix=s.milvus_collection_prefix,
                   index_type=s.milvus_index_type, metric=s.milvus_metric, ivf_nlist=s.milvus_ivf_nlist,
                   ivf_nprobe=s.milvus_ivf_nprobe)

    def collection(self, role: str) -> str:
        return f"{self.collection_prefix}_{role}"


def region_key(image_id: int, index: int) -> int:
    """Region primary keys: the image id with the region index in the low bits, kept positive."""
    return ((image_id << 5) | index) & 0x7FFF_FFFF_FFFF_FFFF


CONNECT_DEADLINE_S = 3.0  # a refused MEMETRACE_MILVUS_URI fails after retrying this long, in one line
# pymilvus' own default wait for a channel: also how long it waits when it reconnects later, so not
# shortened (under load, a Milvus Lite server drops channels that must come back)
CHANNEL_TIMEOUT_S = 10.0
# client -> the address of the Milvus Lite it was connected to, for clients of a Lite folder
_LITE_ADDRESS: weakref.WeakKeyDictionary[MilvusClient, str] = weakref.WeakKeyDictionary()


def connect(config: MilvusConfig, attempts: int = 5, deadline_s: float = CONNECT_DEADLINE_S) -> MilvusClient:
    """A client for ``config.uri``; a Milvus Lite folder is created if missing and shared with the
    other memetrace processes on it (:mod:`memetrace.lite_server`).

    Connecting is retried with backoff, ``attempts`` tries within ``deadline_s``: a server that is
    starting, or that just dropped a connection (Milvus Lite's server answers pymilvus' keep-alive
    pings with "too many pings" and closes the channel under load), is usually there a moment later.
    """
    uri = config.uri
    if "://" not in uri:
        from memetrace.lite_server import shared_uri

        uri = shared_uri(Path(uri))
    deadline, attempt = time.monotonic() + deadline_s, 1
    while True:
        try:
            client = MilvusClient(uri=uri, token=config.token, timeout=CHANNEL_TIMEOUT_S)
            if "://" not in config.uri:
                _LITE_ADDRESS[client] = uri
            return client
        except MilvusException as exc:
            pause = 0.1 * 2 ** attempt
            if attempt >= attempts or time.monotonic() + pause > deadline:
                raise DependencyDown("milvus", f"no Milvus answers at {config.uri} ({exc.message}): start it, or "
                                               "fix MEMETRACE_MILVUS_URI (empty = Milvus Lite in the data dir)"
                                     ) from exc
            time.sleep(pause)
            attempt += 1


def stored_dim(client: MilvusClient, config: MilvusConfig) -> int | None:
    """Descriptor size of the existing images collection, None if there is none yet."""
    name = config.collection("images")
    if not client.has_collection(name):
        return None
    fields = client.describe_collection(name)["fields"]
    return next(int(f["params"]["dim"]) for f in fields if f["name"] == "vector")


# Build and search parameters per MEMETRACE_MILVUS_INDEX_TYPE, within Milvus' documented ranges.
# IVF_*: nlist in [1, 65536] clusters per segment, nprobe in [1, nlist] of them searched (by default
# 16 of 128: recall first, the candidates are verified anyway; MEMETRACE_MILVUS_IVF_NLIST / _NPROBE).
# HNSW: ef in [limit, 32768]. DISKANN: no build parameters, search_list in [limit, ...] (Milvus 2.3
# caps it at 200 while limit <= 20).


def index_params(client: MilvusClient, config: MilvusConfig):
    params = client.prepare_index_params()
    index_type = config.index_type
    extra = ({"M": 16, "efConstruction": 200} if index_type == "HNSW"
             else {"nlist": config.ivf_nlist} if index_type in ("IVF_FLAT", "IVF_SQ8") else {})
    params.add_index(field_name="vector", index_type=index_type, metric_type=config.metric, params=extra)
    return params


def search_params(config: MilvusConfig, limit: int) -> dict:
    index_type = config.index_type
    extra = ({"ef": max(64, limit)} if index_type == "HNSW"
             else {"nprobe": min(config.ivf_nprobe, config.ivf_nlist)} if index_type in ("IVF_FLAT", "IVF_SQ8")
             else {"search_list": max(100, limit)} if index_type == "DISKANN" else {})
    return {"metric_type": config.metric, **({"params": extra} if extra else {})}


# ---------------------------------------------------------------------------------- failures

# what a Milvus that is down, restarting or overloaded raises through pymilvus
_FAILURES = (MilvusException, grpc.RpcError, ConnectionError, TimeoutError)
# refused by pymilvus before sending: the request itself is wrong
_REFUSED_BY_CLIENT = (ParamError, DataTypeNotMatchException, DataNotMatchException, PrimaryKeyException)
# refused by the server as malformed: IllegalArgument (Milvus Lite, both code fields), ParameterInvalid,
# ParameterMissing, ParameterTooLarge, FieldNotFound; Milvus 2.3 answers a bad filter 65535 + this text
_BAD_REQUEST_CODES = {6, 1100, 1101, 1102, 1700}
_BAD_EXPRESSION = "cannot parse expression"


def is_bug(exc: BaseException) -> bool:
    """A request Milvus cannot run as written: retrying it would fail the same way."""
    return isinstance(exc, MilvusException) and (
        isinstance(exc, _REFUSED_BY_CLIENT) or exc.is_input_error or exc.code in _BAD_REQUEST_CODES
        or _BAD_EXPRESSION in str(exc.message))


def not_loaded(exc: BaseException) -> bool:
    """Milvus refused a collection that is not loaded (code 101: e.g. after a Milvus Lite restart)."""
    return isinstance(exc, MilvusException) and (getattr(exc, "code", None) == 101 or "call load()" in str(exc))


def _guarded(method: F, writes: bool) -> F:
    @functools.wraps(method)
    def call(self: _MilvusBackend, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except _FAILURES as exc:
            if is_bug(exc) and writes:  # rows this schema cannot hold: the same message fails again
                raise Refused("milvus", f"{type(exc).__name__}: {exc}") from exc
            if is_bug(exc):
                raise
            if not_loaded(exc):
                self._reload()
            self._rejoin()
            raise DependencyDown("milvus", f"{type(exc).__name__}: {exc}") from exc

    return call  # type: ignore[return-value]


class _MilvusBackend:
    """What the three backends share: the client, their collections, the failure translation.

    Every public method of a subclass (and its constructor, which creates the collections) is
    wrapped by :func:`_guarded`; those named in :attr:`WRITES` store the caller's rows.
    """

    WRITES = frozenset({"upsert", "add_occurrences", "add_dead_letters", "publish", "remove_images"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, attr in list(vars(cls).items()):
            if callable(attr) and (name == "__init__" or not name.startswith("_")):
                setattr(cls, name, _guarded(attr, writes=name in cls.WRITES))

    def __init__(self, client: MilvusClient, config: MilvusConfig, roles: Sequence[str]) -> None:
        self.client = client
        self.config = config
        self.collections = [config.collection(r) for r in roles]

    @property
    def _read(self) -> str:
        """The consistency of every read but a migration's (which must see every row)."""
        return self.config.read_consistency

    def _reload(self) -> None:
        """Load this backend's collections again (idempotent); a Milvus still down: the next retry tries again."""
        try:
            for name in getattr(self, "collections", ()):
                self.client.load_collection(name)
        except _FAILURES as exc:
            log.warning("reloading Milvus collections failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _rejoin(self) -> None:
        """The Milvus Lite this client joined was served by a process that ended: serve the folder
        here, or join its next host (:mod:`memetrace.lite_server`), so that the caller's retry succeeds."""
        joined = _LITE_ADDRESS.get(self.client) if hasattr(self, "client") else None
        if joined is None:
            return  # a Milvus server: nothing to rejoin
        from memetrace.lite_server import shared_uri

        try:
            if shared_uri(Path(self.config.uri)) == joined:
                return
            self.client = connect(self.config)
        except (ConfigError, DependencyDown) as exc:  # the old host still holds the folder: next retry
            log.warning("rejoining Milvus Lite failed", extra={"error": str(exc)})
            return
        self._reload()

    def _create(self, name: str, schema, index_params) -> None:
        """Create a collection; another process creating it at the same moment is fine (services
        starting together race here: Milvus Lite then fails with 'File exists', and lists the
        collection only once its creator is done)."""
        try:
            self.client.create_collection(name, schema=schema, index_params=index_params, consistency_level=STRONG)
        except MilvusException:
            deadline = time.monotonic() + 10
            while not self.client.has_collection(name):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _ensure_records(self, name: str, varchars: Sequence[tuple[str, int]], ints: Sequence[str]) -> None:
        """A record collection (primary key ``id``, :data:`DUMMY_VECTOR`, these fields), loaded."""
        if not self.client.has_collection(name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=len(DUMMY_VECTOR))
            for field, length in varchars:
                schema.add_field(field, DataType.VARCHAR, max_length=length)
            for field in ints:
                schema.add_field(field, DataType.INT64)
            params = self.client.prepare_index_params()
            params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
            self._create(name, schema, params)
        self.client.load_collection(name)

    def _count(self, collection: str, filter: str = "") -> int:
        res = self.client.query(collection, filter=filter, output_fields=["count(*)"],
                                consistency_level=self._read)
        return int(res[0]["count(*)"])

    def _query_all(self, collection: str, fields: list[str], filter: str = "id >= 0") -> list[dict]:
        """Every row matching ``filter``, through an iterator: one query returns 16384 rows at most."""
        it = self.client.query_iterator(collection, batch_size=1000, filter=filter, output_fields=fields,
                                        consistency_level=self._read)
        out: list[dict] = []
        try:
            while batch := it.next():
                out.extend(batch)
        finally:
            it.close()
        return out

    def _field_values(self, collection: str, field: str) -> list:
        return [r[field] for r in self._query_all(collection, [field])]


def _ids(image_ids: Sequence[int]) -> list[int]:
    return [int(i) for i in image_ids]


# ---------------------------------------------------------------------------------- vector index

_IMAGE_FIELDS = ["id", "path", "width", "height", "nbytes", "nb_points"]  # what get() reads


class MilvusVectorIndex(_MilvusBackend, VectorIndex):
    """Collections ``<prefix>_images`` (global descriptor, path, sizes, indexed_at in ms) and
    ``<prefix>_regions`` (one row per region, keyed by :func:`region_key`)."""

    def __init__(self, client: MilvusClient, config: MilvusConfig, dim: int) -> None:
        super().__init__(client, config, ["images", "regions"])
        self.dim = dim
        self.images, self.regions = self.collections
        if not self.client.has_collection(self.images):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            schema.add_field("path", DataType.VARCHAR, max_length=IMAGE_BYTES["path"])
            schema.add_field("width", DataType.INT32)
            schema.add_field("height", DataType.INT32)
            schema.add_field("nbytes", DataType.INT64)
            schema.add_field("nb_points", DataType.INT32)
            schema.add_field("indexed_at", DataType.INT64)  # unix milliseconds
            self._create(self.images, schema, index_params(self.client, config))
        if not self.client.has_collection(self.regions):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("image_id", DataType.INT64)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            self._create(self.regions, schema, index_params(self.client, config))
        # writers racing on a collection nobody loaded lose rows in Milvus Lite: load it first
        self.client.load_collection(self.images)
        self.client.load_collection(self.regions)

    def upsert(self, rows: Sequence[ImageRow]) -> None:
        if not rows:
            return
        now = now_ms()
        self.client.upsert(self.images, [
            {"id": r.image_id, "vector": np.asarray(r.vector, dtype=np.float32), "path": r.path,
             "width": r.width, "height": r.height, "nbytes": r.nbytes, "nb_points": r.nb_points, "indexed_at": now}
            for r in (fitted(r, IMAGE_BYTES) for r in rows)
        ])
        regions = [{"id": region_key(r.image_id, i), "image_id": r.image_id, "vector": np.asarray(v, np.float32)}
                   for r in rows for i, v in enumerate(r.regions)]
        if regions:
            self.client.upsert(self.regions, regions)

    def existing(self, image_ids: Sequence[int]) -> set[int]:
        if not image_ids:
            return set()
        rows = self.client.query(self.images, filter=f"id in {_ids(image_ids)}", output_fields=["id"],
                                 consistency_level=self._read)
        return {int(r["id"]) for r in rows}

    def get(self, image_ids: Sequence[int]) -> dict[int, ImageRecord]:
        if not image_ids:
            return {}
        rows = self.client.query(self.images, filter=f"id in {_ids(image_ids)}", output_fields=_IMAGE_FIELDS,
                                 consistency_level=self._read)
        return {int(r["id"]): ImageRecord(int(r["id"]), r["path"], int(r["width"]), int(r["height"]), int(r["nbytes"]),
                                          int(r["nb_points"])) for r in rows}

    def vectors(self, image_ids: Sequence[int], with_regions: bool = True
                ) -> tuple[list[int], np.ndarray, list[np.ndarray]]:
        ids = _ids(image_ids)
        if not ids:
            return [], np.zeros((0, self.dim), np.float32), []
        images = functools.partial(self.client.query, self.images, filter=f"id in {ids}",
                                   output_fields=["id", "vector"], consistency_level=self._read)
        regions = functools.partial(self.client.query, self.regions, filter=f"image_id in {ids}",
                                    output_fields=["id", "image_id", "vector"], consistency_level=self._read)
        # both queries at once: one round trip's wait
        rows, region_rows = concurrently(images, regions) if with_regions else (images(), [])
        glob = {k: v[0] for k, v in _vectors_by_id(rows, "id", self.dim).items()}
        regs = _vectors_by_id(region_rows, "image_id", self.dim)
        found = [i for i in ids if i in glob]
        g = np.stack([glob[i] for i in found]) if found else np.zeros((0, self.dim), np.float32)
        r = [np.stack(regs[i]) if regs.get(i) else np.zeros((0, self.dim), np.float32) for i in found]
        return found, g, r

    def count(self) -> int:
        return self._count(self.images)

    def remove_images(self, image_ids: Sequence[int]) -> None:
        if image_ids:
            self.client.delete(self.images, ids=_ids(image_ids))
            self.client.delete(self.regions, filter=f"image_id in {_ids(image_ids)}")

    def stored_before(self, when: int) -> bool:
        return bool(self.client.query(self.images, filter=f"indexed_at < {int(when)}", output_fields=["id"],
                                      limit=1, consistency_level=self._read))

    def ping(self, timeout_s: float) -> None:
        self.client.has_collection(self.images, timeout=timeout_s)

    def search_images(self, vectors: np.ndarray, limit: int, stored_before: int | None = None) -> Hits:
        return self._search(self.images, vectors, limit, "id",
                            filter="" if stored_before is None else f"indexed_at < {int(stored_before)}")

    def search_regions(self, vectors: np.ndarray, limit: int) -> Hits:
        return self._search(self.regions, vectors, limit, "image_id")

    def _search(self, collection: str, vectors: np.ndarray, limit: int, id_field: str, filter: str = "") -> Hits:
        if len(vectors) == 0:
            return []
        res = self.client.search(collection, data=list(np.asarray(vectors, dtype=np.float32)), limit=limit,
                                 filter=filter, output_fields=[id_field] if id_field != "id" else [],
                                 search_params=search_params(self.config, limit),
                                 consistency_level=self._read)
        return [[(int(h["entity"][id_field]) if id_field != "id" else int(h["id"]), float(h["distance"]))
                 for h in hits] for hits in res]


def _vectors_by_id(rows: Sequence[dict], key: str, dim: int) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {}
    for r in sorted(rows, key=lambda r: int(r["id"])):
        out.setdefault(int(r[key]), []).append(np.asarray(r["vector"], dtype=np.float32).reshape(dim))
    return out


# ---------------------------------------------------------------------------------- occurrence log


#: the occurrences collection's schema version, in its name (``<prefix>_occurrences_v2``): a data dir
#: whose occurrences an older memetrace wrote is migrated when the log opens (:meth:`MilvusOccurrenceLog._migrate`)
OCCURRENCES_VERSION = 2
#: what the unversioned collection (version 1, no ``meta``) lacks, with the value its rows get
_ADDED_IN_V2 = {"meta": "{}", "seen_at": -1}
_OCCURRENCE_INTS = ["image_id", "posted_at", "seen_at"]


class MilvusOccurrenceLog(_MilvusBackend, OccurrenceLog):
    """Collections ``<prefix>_occurrences_v2`` and ``<prefix>_deadletters``; string fields are cut to
    their bytes (:data:`~memetrace.occurrence_log.OCCURRENCE_BYTES`, ``DEAD_LETTER_BYTES``), the
    meta kept as JSON text (:func:`~memetrace.occurrence_log.fitted_occurrence`)."""

    def __init__(self, client: MilvusClient, config: MilvusConfig) -> None:
        super().__init__(client, config, [f"occurrences_v{OCCURRENCES_VERSION}", "deadletters"])
        self.occurrences, self.deadletters = self.collections
        self._ensure_records(self.occurrences, [*OCCURRENCE_BYTES.items(), ("meta", META_BYTES)], _OCCURRENCE_INTS)
        self._ensure_records(self.deadletters, list(DEAD_LETTER_BYTES.items()), ["dead_at"])
        self._migrate(config.collection("occurrences"))

    def _migrate(self, old: str) -> None:
        """Copy the rows of the version-1 collection ``old`` here (meta empty), then drop it.

        Rows are upserted by their key, so an interrupted copy is done again by the next process
        that opens the log, and two processes may copy at once: the one that drops ``old`` has
        copied every row first, and the other then stops. A process of the older version writing
        meanwhile writes to ``old``; its rows come over the next time the log opens."""
        if not self.client.has_collection(old):
            return
        fields = [f["name"] for f in self.client.describe_collection(old)["fields"] if f["name"] != "vector"]
        copied = 0
        try:
            self.client.load_collection(old)
            it = self.client.query_iterator(old, batch_size=_UPSERT_CHUNK, filter="id >= 0", output_fields=fields,
                                            consistency_level=STRONG)
            try:
                while batch := it.next():
                    self.client.upsert(self.occurrences, [_ADDED_IN_V2 | {k: r[k] for k in fields}
                                                          | {"vector": DUMMY_VECTOR} for r in batch])
                    copied += len(batch)
            finally:
                it.close()
        except _FAILURES:
            if self.client.has_collection(old):
                raise
            return  # another process copied every row and dropped it
        self.client.drop_collection(old)
        log.warning("migrated the occurrence log to schema version %d", OCCURRENCES_VERSION,
                    extra={"from": old, "to": self.occurrences, "rows": copied})

    def add_occurrences(self, rows: Sequence[OccurrenceRow]) -> None:
        if rows:
            now = int(time.time())
            self.client.upsert(self.occurrences, [
                {"id": r.id, "vector": DUMMY_VECTOR, "image_id": r.image_id, "post_id": r.post_id, "url": r.url,
                 "posted_at": r.posted_at, "platform": r.platform, "author": r.author, "seen_at": now,
                 "meta": json_text(r.meta)}
                for r in (fitted_occurrence(r) for r in rows)])

    def add_dead_letters(self, rows: Sequence[DeadLetterRow]) -> None:
        if rows:
            now = int(time.time())
            self.client.upsert(self.deadletters, [
                {"id": r.id, "vector": DUMMY_VECTOR, "reason": r.reason, "detail": r.detail, "post_id": r.post_id,
                 "url": r.url, "source": r.source, "dead_at": now}
                for r in (fitted(r, DEAD_LETTER_BYTES) for r in rows)])

    def count_occurrences(self) -> int:
        return self._count(self.occurrences)

    def count_dead_letters(self) -> int:
        return self._count(self.deadletters)

    def occurrences_of(self, image_ids: Sequence[int]) -> list[OccurrenceRow]:
        if not image_ids:
            return []
        rows = self._query_all(self.occurrences, _OCCURRENCE_FIELDS, filter=f"image_id in {_ids(image_ids)}")
        return [OccurrenceRow(**{f: json.loads(r[f]) if f == "meta" else r[f] for f in _OCCURRENCE_FIELDS})
                for r in rows]

    def image_ids_of_occurrences(self) -> list[int]:
        return [int(v) for v in self._field_values(self.occurrences, "image_id")]

    def remove_images(self, image_ids: Sequence[int]) -> None:
        if image_ids:
            self.client.delete(self.occurrences, filter=f"image_id in {_ids(image_ids)}")

    def dead_letters_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self._field_values(self.deadletters, "reason"):
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items()))


# a row holds every field of an occurrence (``seen_at`` and ``meta`` too)
_OCCURRENCE_FIELDS = [f.name for f in dataclasses.fields(OccurrenceRow)]


# ---------------------------------------------------------------------------------- cluster board

_SUMMARY_FIELDS = ("id", "images", "posts", "first_seen", "last_seen", "growth_hour", "growth_day", "updated_at",
                   "platforms", "history")


class MilvusClusterBoard(_MilvusBackend, ClusterBoard):
    """Collections ``<prefix>_clusters`` (image -> cluster) and ``<prefix>_cluster_summaries``
    (platforms and history as JSON, trimmed by :func:`~memetrace.cluster_board.fitted_summary`)."""

    def __init__(self, client: MilvusClient, config: MilvusConfig) -> None:
        super().__init__(client, config, ["clusters", "cluster_summaries"])
        self.clusters, self.cluster_summaries = self.collections
        self._ensure_records(self.clusters, [], ["cluster_id"])
        self._ensure_records(self.cluster_summaries, [("platforms", PLATFORMS_BYTES), ("history", HISTORY_BYTES)],
                             ["images", "posts", "first_seen", "last_seen", "growth_hour", "growth_day", "updated_at"])

    def publish(self, assignment: dict[int, int], summaries: Sequence[ClusterSummary],
                removed: Sequence[int] = ()) -> None:
        items = sorted(assignment.items())
        for i in range(0, len(items), _UPSERT_CHUNK):
            self.client.upsert(self.clusters, [{"id": int(img), "vector": DUMMY_VECTOR, "cluster_id": int(cid)}
                                               for img, cid in items[i:i + _UPSERT_CHUNK]])
        rows = [_summary_row(c) for c in summaries]
        for i in range(0, len(rows), _UPSERT_CHUNK):
            self.client.upsert(self.cluster_summaries, rows[i:i + _UPSERT_CHUNK])
        if removed:
            self.client.delete(self.cluster_summaries, ids=[int(c) for c in removed])

    def clusters_of(self, image_ids: Sequence[int]) -> dict[int, int]:
        if not image_ids:
            return {}
        rows = self.client.query(self.clusters, filter=f"id in {_ids(image_ids)}",
                                 output_fields=["id", "cluster_id"], consistency_level=self._read)
        return {int(r["id"]): int(r["cluster_id"]) for r in rows}

    def members(self, cluster_ids: Sequence[int]) -> dict[int, list[int]]:
        """One query; a viral cluster's 16384+ rows come through the iterator."""
        out: dict[int, list[int]] = {int(c): [] for c in cluster_ids}
        if out:
            for r in self._query_all(self.clusters, ["id", "cluster_id"], f"cluster_id in {list(out)}"):
                out[int(r["cluster_id"])].append(int(r["id"]))
        return {c: sorted(ids) for c, ids in out.items()}

    def remove_images(self, image_ids: Sequence[int]) -> None:
        if image_ids:
            self.client.delete(self.clusters, ids=_ids(image_ids))

    def summary(self, cluster_id: int) -> ClusterSummary | None:
        rows = self.client.query(self.cluster_summaries, filter=f"id == {int(cluster_id)}",
                                 output_fields=list(_SUMMARY_FIELDS), consistency_level=self._read)
        return _summary_of(rows[0]) if rows else None

    def summaries(self) -> list[ClusterSummary]:
        return [_summary_of(r) for r in self._query_all(self.cluster_summaries, list(_SUMMARY_FIELDS))]


def _summary_row(c: ClusterSummary) -> dict:
    c = fitted_summary(c)
    return {"id": c.cluster_id, "vector": DUMMY_VECTOR, "images": c.images, "posts": c.posts,
            "first_seen": c.first_seen, "last_seen": c.last_seen, "growth_hour": c.growth_hour,
            "growth_day": c.growth_day, "updated_at": c.updated_at, "platforms": json.dumps(c.platforms),
            "history": json.dumps(c.history)}


def _summary_of(r: dict) -> ClusterSummary:
    return ClusterSummary(int(r["id"]), int(r["images"]), int(r["posts"]), int(r["first_seen"]), int(r["last_seen"]),
                          int(r["growth_hour"]), int(r["growth_day"]), json.loads(r["platforms"]),
                          json.loads(r["history"]), int(r["updated_at"]))

