"""The vector store: one Milvus collection of images (global descriptor) and one of regions.

The same code talks to Milvus Lite (a file URI, the embedded default) and to a Milvus server
(``http://host:19530``). Primary keys derive from the content hash, so writing an image twice
upserts the same rows (idempotent re-indexing and redelivery).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from memetrace.models import Candidate, ClusterSummary, DeadLetterRow, ImageRow, OccurrenceRow
from memetrace.settings import Settings

STRONG = "Strong"












# Milvus refuses a collection without a vector field; the occurrence and dead-letter tables are
# plain records (looked up by primary key, counted, filtered by image_id), so they carry this
# constant 2-d vector: the smallest a FLOAT_VECTOR may be, never searched.
DUMMY_VECTOR = [0.0, 0.0]


def region_key(image_id: int, index: int) -> int:
    """Region primary keys: the image id with the region index in the low bits, kept positive."""
    return ((image_id << 5) | index) & 0x7FFF_FFFF_FFFF_FFFF


def connect(settings: Settings, attempts: int = 5) -> MilvusClient:
    """A client for ``settings.resolved_milvus_uri()`` (a Milvus Lite file is created if missing).

    Connecting is retried with backoff: a server that is starting, or that just dropped a
    connection (Milvus Lite's server answers pymilvus' keep-alive pings with "too many pings"
    and closes the channel under load), is usually there a moment later.
    """
    uri = settings.resolved_milvus_uri()
    if "://" not in uri:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts - 1):
        try:
            return MilvusClient(uri=uri, token=settings.milvus_token)
        except MilvusException:
            time.sleep(0.5 * 2 ** attempt)
    try:
        return MilvusClient(uri=uri, token=settings.milvus_token)
    except MilvusException as exc:
        raise MilvusException(message=f"cannot connect to Milvus at {uri} (MEMETRACE_MILVUS_URI): {exc}") from exc


def stored_dim(client: MilvusClient, settings: Settings) -> int | None:
    """Descriptor size of the existing images collection, None if there is none yet."""
    name = f"{settings.milvus_collection_prefix}_images"
    if not client.has_collection(name):
        return None
    fields = client.describe_collection(name)["fields"]
    return next(int(f["params"]["dim"]) for f in fields if f["name"] == "vector")


class MilvusStore:
    """Writes and searches descriptors. ``client`` is injectable so tests can hand their own."""

    def __init__(self, settings: Settings, dim: int, client: MilvusClient | None = None) -> None:
        self.settings = settings
        self.dim = dim
        self.client = client or connect(settings)
        self.images = f"{settings.milvus_collection_prefix}_images"
        self.regions = f"{settings.milvus_collection_prefix}_regions"
        self._ensure_collections()
        self.occurrences = f"{settings.milvus_collection_prefix}_occurrences"
        self.deadletters = f"{settings.milvus_collection_prefix}_deadletters"
        self.clusters = f"{settings.milvus_collection_prefix}_clusters"
        self.cluster_summaries = f"{settings.milvus_collection_prefix}_cluster_summaries"
        self._ensure_record_collections()

    # Build and search parameters per MEMETRACE_MILVUS_INDEX_TYPE, within Milvus' documented ranges.
    # IVF_*: nlist in [1, 65536] clusters per segment, nprobe in [1, nlist] of them searched (1/8:
    # recall first, the candidates are verified anyway). HNSW: ef in [limit, 32768]. DISKANN: no
    # build parameters, search_list in [limit, ...] (Milvus 2.3 caps it at 200 while limit <= 20).
    _IVF_NLIST = 128
    _IVF_NPROBE = 16

    def _index_params(self):
        params = self.client.prepare_index_params()
        index_type = self.settings.milvus_index_type
        extra = ({"M": 16, "efConstruction": 200} if index_type == "HNSW"
                 else {"nlist": self._IVF_NLIST} if index_type in ("IVF_FLAT", "IVF_SQ8") else {})
        params.add_index(field_name="vector", index_type=index_type,
                         metric_type=self.settings.milvus_metric, params=extra)
        return params

    def _search_params(self, limit: int) -> dict:
        index_type = self.settings.milvus_index_type
        extra = ({"ef": max(64, limit)} if index_type == "HNSW"
                 else {"nprobe": self._IVF_NPROBE} if index_type in ("IVF_FLAT", "IVF_SQ8")
                 else {"search_list": max(100, limit)} if index_type == "DISKANN" else {})
        return {"metric_type": self.settings.milvus_metric, **({"params": extra} if extra else {})}

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

    def _ensure_collections(self) -> None:
        if not self.client.has_collection(self.images):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            schema.add_field("path", DataType.VARCHAR, max_length=4096)
            schema.add_field("width", DataType.INT32)
            schema.add_field("height", DataType.INT32)
            schema.add_field("nbytes", DataType.INT64)
            schema.add_field("nb_points", DataType.INT32)
            schema.add_field("indexed_at", DataType.INT64)  # unix milliseconds
            self._create(self.images, schema, self._index_params())
        if not self.client.has_collection(self.regions):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("image_id", DataType.INT64)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            self._create(self.regions, schema, self._index_params())
        # writers racing on a collection nobody loaded lose rows in Milvus Lite: load it first
        self.client.load_collection(self.images)
        self.client.load_collection(self.regions)

    def upsert(self, rows: Sequence[ImageRow]) -> None:
        if not rows:
            return
        now = time.time_ns() // 1_000_000  # ms: runs a second apart must tell their images apart
        self.client.upsert(self.images, [
            {"id": r.image_id, "vector": np.asarray(r.vector, dtype=np.float32), "path": r.path[:4096], "width": r.width,
             "height": r.height, "nbytes": r.nbytes, "nb_points": r.nb_points, "indexed_at": now}
            for r in rows
        ])
        regions = [{"id": region_key(r.image_id, i), "image_id": r.image_id, "vector": np.asarray(v, np.float32)}
                   for r in rows for i, v in enumerate(r.regions)]
        if regions:
            self.client.upsert(self.regions, regions)

    def existing(self, image_ids: Sequence[int]) -> set[int]:
        if not image_ids:
            return set()
        rows = self.client.query(self.images, filter=f"id in {list(map(int, image_ids))}",
                                 output_fields=["id"], consistency_level=STRONG)
        return {int(r["id"]) for r in rows}

    def get(self, image_ids: Sequence[int]) -> dict[int, dict]:
        if not image_ids:
            return {}
        rows = self.client.query(self.images, filter=f"id in {list(map(int, image_ids))}",
                                 output_fields=["id", "path", "width", "height", "nbytes", "nb_points"],
                                 consistency_level=STRONG)
        return {int(r["id"]): dict(r) for r in rows}

    def vectors(self, image_ids: Sequence[int], with_regions: bool = True
                ) -> tuple[list[int], np.ndarray, list[np.ndarray]]:
        """(ids found, global N x D, per image its R_i x D regions) for stored images, in order."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return [], np.zeros((0, self.dim), np.float32), []
        rows = self.client.query(self.images, filter=f"id in {ids}", output_fields=["id", "vector"],
                                 consistency_level=STRONG)
        glob = {k: v[0] for k, v in _vectors_by_id(rows, "id", self.dim).items()}
        regs: dict[int, list[np.ndarray]] = {}
        if with_regions:
            rows = self.client.query(self.regions, filter=f"image_id in {ids}",
                                     output_fields=["id", "image_id", "vector"], consistency_level=STRONG)
            regs = _vectors_by_id(rows, "image_id", self.dim)
        found = [i for i in ids if i in glob]
        g = np.stack([glob[i] for i in found]) if found else np.zeros((0, self.dim), np.float32)
        r = [np.stack(regs[i]) if regs.get(i) else np.zeros((0, self.dim), np.float32) for i in found]
        return found, g, r

    def count(self) -> int:
        res = self.client.query(self.images, filter="", output_fields=["count(*)"], consistency_level=STRONG)
        return int(res[0]["count(*)"])

    def _search(self, collection: str, vectors: np.ndarray, limit: int, id_field: str,
                filter: str = "") -> list[list[tuple[int, float]]]:
        if len(vectors) == 0:
            return []
        res = self.client.search(collection, data=list(np.asarray(vectors, dtype=np.float32)), limit=limit,
                                 filter=filter, output_fields=[id_field] if id_field != "id" else [],
                                 search_params=self._search_params(limit),
                                 consistency_level=STRONG)
        out = []
        for hits in res:
            out.append([(int(h["entity"][id_field]) if id_field != "id" else int(h["id"]), float(h["distance"]))
                        for h in hits])
        return out

    def candidates(self, vector: np.ndarray, regions: np.ndarray, k: int, exclude: int) -> list[Candidate]:
        """Images most similar to a query, by its global and regional descriptors in both directions."""
        return self.candidates_many(vector[None], [regions], k, [exclude])[0]

    def stored_before(self, when: int) -> bool:
        """Whether any image was stored before ``when`` (unix milliseconds)."""
        return bool(self.client.query(self.images, filter=f"indexed_at < {int(when)}", output_fields=["id"],
                                      limit=1, consistency_level=STRONG))

    def candidates_many(self, vectors: np.ndarray, regions: Sequence[np.ndarray], k: int,
                        exclude: Sequence[int], regions_vs_stored_before: int | None = None) -> list[list[Candidate]]:
        """Candidates of each query, best first.

        ``regions_vs_stored_before``: when all images stored since that time are queried in the
        same run, their pairs are found by the whole-vs-regions search from the other side, so
        the query regions only need to be searched against images stored before it. One search
        per region is most of the cost (Milvus Lite spends ~1.4 ms per query vector).
        """
        n = len(vectors)
        best: list[dict[int, float]] = [{} for _ in range(n)]

        def add(query_of_row: Sequence[int], hits: list[list[tuple[int, float]]]) -> None:
            for q, row in zip(query_of_row, hits):
                for image_id, sim in row:
                    if image_id != exclude[q] and sim > best[q].get(image_id, -1.0):
                        best[q][image_id] = sim

        limit = k + 1
        add(range(n), self._search(self.images, vectors, limit, "id"))
        # the query whole vs stored regions: the query was cropped from, or pasted into, them
        add(range(n), self._search(self.regions, vectors, limit * 3, "image_id"))
        # query regions vs stored wholes: a stored image is a tile or a crop of the query
        owners = [i for i, r in enumerate(regions) for _ in range(len(r))]
        since = regions_vs_stored_before
        if owners and (since is None or self.stored_before(since)):
            add(owners, self._search(self.images, np.concatenate(list(regions)), limit, "id",
                                     filter="" if since is None else f"indexed_at < {int(since)}"))
        return [sorted((Candidate(i, s) for i, s in b.items()), key=lambda c: -c.similarity)[:k] for b in best]


    # ---------------------------------------------------------------- occurrences and dead letters
    # Shared by every ingest worker (one Milvus), keyed so that a redelivered message upserts
    # the row it wrote before: the counts are exact under at-least-once delivery.

    def _ensure_record_collections(self) -> None:
        varchars = {self.occurrences: [("post_id", 1024), ("url", 4096), ("platform", 64), ("author", 256)],
                    self.deadletters: [("reason", 64), ("detail", 1024), ("post_id", 1024), ("url", 4096),
                                       ("source", 512)],
                    self.clusters: [],
                    self.cluster_summaries: [("platforms", _PLATFORMS_CHARS), ("history", _HISTORY_CHARS)]}
        ints = {self.occurrences: ["image_id", "posted_at", "seen_at"], self.deadletters: ["dead_at"],
                self.clusters: ["cluster_id"],
                self.cluster_summaries: ["images", "posts", "first_seen", "last_seen", "growth_hour",
                                         "growth_day", "updated_at"]}
        for name in varchars:
            if not self.client.has_collection(name):
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("id", DataType.INT64, is_primary=True)
                schema.add_field("vector", DataType.FLOAT_VECTOR, dim=len(DUMMY_VECTOR))
                for field, length in varchars[name]:
                    schema.add_field(field, DataType.VARCHAR, max_length=length)
                for field in ints[name]:
                    schema.add_field(field, DataType.INT64)
                params = self.client.prepare_index_params()
                params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
                self._create(name, schema, params)
            self.client.load_collection(name)

    def upsert_occurrences(self, rows: Sequence[OccurrenceRow]) -> None:
        if rows:
            now = int(time.time())
            self.client.upsert(self.occurrences, [
                {"id": r.id, "vector": DUMMY_VECTOR, "image_id": r.image_id, "post_id": r.post_id[:1024],
                 "url": r.url[:4096], "posted_at": r.posted_at, "platform": r.platform[:64],
                 "author": r.author[:256], "seen_at": now} for r in rows])

    def upsert_deadletters(self, rows: Sequence[DeadLetterRow]) -> None:
        if rows:
            now = int(time.time())
            self.client.upsert(self.deadletters, [
                {"id": r.id, "vector": DUMMY_VECTOR, "reason": r.reason[:64], "detail": r.detail[:1024],
                 "post_id": r.post_id[:1024], "url": r.url[:4096], "source": r.source[:512], "dead_at": now}
                for r in rows])

    def _count(self, collection: str, filter: str = "") -> int:
        res = self.client.query(collection, filter=filter, output_fields=["count(*)"], consistency_level=STRONG)
        return int(res[0]["count(*)"])

    def count_occurrences(self) -> int:
        return self._count(self.occurrences)

    def count_deadletters(self) -> int:
        return self._count(self.deadletters)

    def occurrences_of(self, image_ids: Sequence[int]) -> list[dict]:
        """Every post of these images (image_id, post_id, url, posted_at, platform, author, seen_at)."""
        if not image_ids:
            return []
        return self._query_all(self.occurrences, ["image_id", "post_id", "url", "posted_at", "platform", "author",
                                                  "seen_at"], filter=f"image_id in {list(map(int, image_ids))}")

    def _query_all(self, collection: str, fields: list[str], filter: str = "id >= 0") -> list[dict]:
        """Every row matching ``filter``, through an iterator: one query returns 16384 rows at most."""
        it = self.client.query_iterator(collection, batch_size=1000, filter=filter, output_fields=fields,
                                        consistency_level=STRONG)
        out: list[dict] = []
        try:
            while batch := it.next():
                out.extend(batch)
        finally:
            it.close()
        return out

    def _field_values(self, collection: str, field: str) -> list:
        return [r[field] for r in self._query_all(collection, [field])]

    def deadletters_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self._field_values(self.deadletters, "reason"):
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items()))

    # ---------------------------------------------------------------- clusters
    # Written by the clusterer (the only writer), read by the query API: every API replica sees
    # the same clusters without sharing the clusterer's state file.

    def publish_clusters(self, assignment: dict[int, int], summaries: Sequence[ClusterSummary],
                         removed: Sequence[int] = ()) -> None:
        """Upsert ``assignment`` (image -> cluster, changed rows only is enough) and summaries;
        delete the summaries of the ``removed`` cluster ids (merged away or dissolved)."""
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
        """image -> cluster id for the given images (those the clusterer has seen)."""
        if not image_ids:
            return {}
        rows = self.client.query(self.clusters, filter=f"id in {list(map(int, image_ids))}",
                                 output_fields=["id", "cluster_id"], consistency_level=STRONG)
        return {int(r["id"]): int(r["cluster_id"]) for r in rows}

    def cluster_members(self, cluster_ids: Sequence[int]) -> dict[int, list[int]]:
        """cluster id -> its images, sorted, for each given cluster (one query; a viral one: 16384+ rows)."""
        out: dict[int, list[int]] = {int(c): [] for c in cluster_ids}
        if out:
            for r in self._query_all(self.clusters, ["id", "cluster_id"], f"cluster_id in {list(out)}"):
                out[int(r["cluster_id"])].append(int(r["id"]))
        return {c: sorted(ids) for c, ids in out.items()}

    def cluster_summary(self, cluster_id: int) -> ClusterSummary | None:
        rows = self.client.query(self.cluster_summaries, filter=f"id == {int(cluster_id)}",
                                 output_fields=list(_SUMMARY_FIELDS), consistency_level=STRONG)
        return _summary_of(rows[0]) if rows else None

    def all_cluster_summaries(self) -> list[ClusterSummary]:
        return [_summary_of(r) for r in self._query_all(self.cluster_summaries, list(_SUMMARY_FIELDS))]

    def image_ids_of_occurrences(self) -> list[int]:
        """The image id of every occurrence (one entry per post)."""
        return [int(v) for v in self._field_values(self.occurrences, "image_id")]


_UPSERT_CHUNK = 1000
_PLATFORMS_CHARS = 4096
_HISTORY_CHARS = 16_384
_SUMMARY_FIELDS = ("id", "images", "posts", "first_seen", "last_seen", "growth_hour", "growth_day", "updated_at",
                   "platforms", "history")


def _summary_row(c: ClusterSummary) -> dict:
    platforms = sorted(c.platforms.items(), key=lambda kv: kv[1])[-50:]  # least posted first: dropped first
    return {"id": c.cluster_id, "vector": DUMMY_VECTOR, "images": c.images, "posts": c.posts,
            "first_seen": c.first_seen, "last_seen": c.last_seen, "growth_hour": c.growth_hour,
            "growth_day": c.growth_day, "updated_at": c.updated_at,
            "platforms": _fitting_json(platforms, _PLATFORMS_CHARS, lambda kv: dict(reversed(kv))),
            "history": _fitting_json(list(c.history), _HISTORY_CHARS, list)}


def _fitting_json(items: list, chars: int, as_json: Callable[[list], object]) -> str:
    """JSON of ``as_json`` of the longest tail of ``items`` that fits in ``chars`` (the first items
    matter least): cutting the JSON text instead would leave it unreadable."""
    while len(text := json.dumps(as_json(items))) > chars and items:
        items = items[1:]
    return text


def _summary_of(r: dict) -> ClusterSummary:
    return ClusterSummary(int(r["id"]), int(r["images"]), int(r["posts"]), int(r["first_seen"]), int(r["last_seen"]),
                          int(r["growth_hour"]), int(r["growth_day"]), json.loads(r["platforms"]),
                          json.loads(r["history"]), int(r["updated_at"]))


def _vectors_by_id(rows: Sequence[dict], key: str, dim: int) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {}
    for r in sorted(rows, key=lambda r: int(r["id"])):
        out.setdefault(int(r[key]), []).append(np.asarray(r["vector"], dtype=np.float32).reshape(dim))
    return out
