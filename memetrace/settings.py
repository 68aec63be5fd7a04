"""All configuration, read once from ``MEMETRACE_*`` environment variables (or a ``.env`` file).

Components never take the whole :class:`Settings`: each builds its own small config from it
(``FetchPolicy.from_settings``, ``VerifyConfig.from_settings``, ...), next to the component.
Renamed settings keep their old ``MEMETRACE_*`` names for one release (:data:`RENAMED`), with a
warning; an unknown ``MEMETRACE_*`` name is warned about with the closest known one; invalid
values are reported one line per setting (:func:`invalid_settings`).
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

log = logging.getLogger(__name__)
PREFIX = "MEMETRACE_"
ENV_FILE = ".env"  # read from the working directory, under the environment

#: old name -> the names it now sets (accepted until 0.3, with a warning)
RENAMED: dict[str, tuple[str, ...]] = {
    "kafka_group_id": ("kafka_ingest_group_id",),
    "ingest_retry_max_s": ("retry_max_s",),
    "workers": ("prepare_threads", "match_threads"),
    "catalog_path": ("cluster_state_path",),
    "api_search_consistency": ("api_read_consistency",),
}


class _RenamedEnv(PydanticBaseSettingsSource):
    """Values of the old ``MEMETRACE_*`` names of renamed settings; the new name wins when both are set."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ answers for every field at once

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for old, new in RENAMED.items():
            value = os.environ.get(PREFIX + old.upper())
            if value is None:
                continue
            log.warning(f"{PREFIX}{old.upper()} is deprecated: set {' and '.join(PREFIX + n.upper() for n in new)}",
                        extra={"setting": PREFIX + old.upper()})
            out.update({n: value for n in new if PREFIX + n.upper() not in os.environ})
        return out


def unknown_env_names(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """``MEMETRACE_*`` variables that name no setting -> the closest known name (None if none is close).

    ``environ``: default the process environment and the ``.env`` file Settings reads."""
    known = [PREFIX + n.upper() for n in (*Settings.model_fields, *RENAMED)]
    env = {**dotenv_values(ENV_FILE), **os.environ} if environ is None else environ
    return {k: next(iter(difflib.get_close_matches(k.upper(), known, n=1, cutoff=0.75)), None)
            for k in env if k.upper().startswith(PREFIX) and k.upper() not in known}


def invalid_settings(exc: ValidationError) -> list[str]:
    """One line per bad setting of a failed :class:`Settings`: its ``MEMETRACE_*`` name, the value
    given and what is allowed (pydantic's 20-line report says the same about field names)."""
    lines = []
    for err in exc.errors(include_url=False):
        name = PREFIX + str(err["loc"][0]).upper() if err["loc"] else "a MEMETRACE_* setting"
        lines.append(f"invalid setting {name}={err.get('input')!r}: {err['msg']} (see docs/settings.md)")
    return lines


class Settings(BaseSettings):
    """Every tunable of memetrace; pass an instance down instead of reading the environment."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=ENV_FILE, extra="ignore")

    data_dir: Path = Field(Path("./memetrace-data"), description="where every local store lives")
    milvus_uri: str = Field("", description="Milvus URI; empty = Milvus Lite file in data_dir")
    milvus_token: str = Field("", description='Milvus token or "user:password"; empty = none')
    milvus_collection_prefix: str = Field(
        "memetrace", description="prefix of every Milvus collection name: one Milvus can hold several memetrace "
                                 "indexes")
    milvus_index_type: str = Field(
        "FLAT", description="Milvus index built when the collections are created: FLAT (exact), HNSW, IVF_FLAT, "
                            "IVF_SQ8, DISKANN (docs/deploy.md)")
    milvus_ivf_nlist: int = Field(
        128, ge=1, le=65536, description="lists of an IVF_FLAT / IVF_SQ8 index (set when the collections are created; "
                                         "each search scans nprobe / nlist of every segment): at 1 M images on a "
                                         "2-core Milvus 2.3 server, 1024 lists (nprobe 32) searched no faster than 128 "
                                         "(16) and took 8x longer to index (docs/scale.md)")
    milvus_ivf_nprobe: int = Field(
        16, ge=1, le=65536, description="IVF lists each search scans (at most nlist): raise it to find more of the "
                                        "true neighbours, lower it for faster searches")
    milvus_metric: Literal["IP", "COSINE"] = Field(
        "IP", description="vector similarity; descriptors are L2-normalised, so IP and COSINE rank alike "
                          "(a distance metric such as L2 would invert MEMETRACE_CANDIDATE_MIN_SIMILARITY)")
    cluster_state_path: Path | None = Field(
        None, description="the clusterer's SQLite state (images, matches, occurrences, clusters, their "
                          "history); empty = data_dir/cluster-state.db (the batch catalog is data_dir/catalog.db)")

    # embedder
    model_name: str = Field(
        "tf_efficientnet_lite0", description="timm model of the embedder; another than the default needs "
                                             "MEMETRACE_MODEL_WEIGHTS")
    model_weights: Path | None = Field(
        None, description="local weights file for model_name; empty = the installed EfficientNet-Lite0 package"
    )
    image_size: int = Field(224, description='CNN input side for the whole image')
    box_image_size: int = Field(
        224, description="input size for content-box crops (160 is cheaper but lost 0.01 F1 on the "
                         "benchmark, screenshots and collages first)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description='auto = cuda when a GPU is visible, else cpu')
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = fp16 on a GPU; on a CPU, fp32 or bf16, whichever is measured faster at the first "
                            "start (cached in data_dir/precision.json)")
    batch_size: int = Field(32, description='images per embedding batch (GPU memory, CPU cache)')
    embed_threads: int = Field(
        0, ge=0, description="torch threads embedding on a CPU; 0 = the CPUs prepare_threads leaves (at least 1): "
                             "embedding runs beside decoding and SIFT, and more busy threads than cores make "
                             "OpenMP spin-wait (5x the CPU time per image measured on 2 shared cores)")
    gem_p: float = Field(
        3.0, description='GeM pooling exponent: 1 = average, higher leans towards the strongest activations')
    regions: bool = Field(True, description="store regional descriptors: off finds fewer partial copies "
                                            "(crops, collage tiles, screenshots), for less storage")
    store_grid_regions: bool = Field(
        False, description="also store the nine grid windows' descriptors (halves, quarters, centre), not only "
                           "the content boxes' (uploaded queries search with them either way): on three benchmark splits "
                           "they found no copy more, took 9 of the 9.5 regional vectors an image (23.5 KB of "
                           "Milvus Lite) and crowded chained copies out of the candidates (docs/scale.md)")

    # keypoints
    sift_features: int = Field(
        600, description="SIFT keypoints kept per image: more find smaller partial copies, at more storage and "
                         "matching time")
    sift_max_side: int = Field(
        448, description='longest side SIFT runs on: higher finds copies of smaller details, slower')
    sift_detect_half: bool = Field(
        False, description="detect SIFT keypoints at half of sift_max_side and describe them at sift_max_side: "
                           "about 3x cheaper SIFT (OpenCV otherwise doubles the image first), but it missed the "
                           "quality floor (dev split: chain copies 0.849; another seed: precision 0.90)")
    local_features: Literal["opencv", "torch"] = Field(
        "opencv", description="SIFT implementation: opencv (CPU), or torch (memetrace.torch_sift: the same "
                              "algorithm and descriptors, on MEMETRACE_DEVICE; the GPU path, several times "
                              "slower than opencv on a CPU)")
    sift_flat_max: float = Field(
        0.35, gt=0, le=1, description="a keypoint is kept when less than this share of its surroundings is flat: "
                                      "raise it to keep more points beside flat patches (0.7 lost collage copies), "
                                      "lower it to drop more caption and interface points")
    sift_smooth_points: int = Field(
        100, ge=0, description="an image keeping fewer keypoints than this is smooth (a sky, a soft or dark photo): "
                               "SIFT runs again at a quarter of its contrast threshold and, still under, keeps gently "
                               "shaded points away from sharp edges too; raise it to treat more images so, 0: off")
    thumbnail_side: int = Field(160, description='longest side of the stored JPEG thumbnail (gallery, API)')
    vector_dims: int = Field(
        0, ge=0, description="dimensions the vector index keeps of each global and regional descriptor, "
                             "projected on a PCA basis shipped per model (memetrace/data/pca<N>_<model>.npy, "
                             "N = 128 or 64): lower it for less Milvus storage (128: 0.42x, at some recall on "
                             "chained copies, see docs/scale.md); 0 = whole descriptors (any model); applies when "
                             "the collections are created, stored ones keep their size")
    keypoint_coding: Literal["pq16", "raw"] = Field(
        "pq16", description="how stored SIFT descriptors are coded (memetrace.kpcodec): pq16 = 16 bytes of "
                           "product-quantized RootSIFT (21 B a keypoint with its x, y and size), raw = the 128 bytes as "
                           "extracted (4.5x the storage, lossless); stored ones of either coding stay readable")

    # decoding guards (memetrace.imageio.DecodeLimits, memetrace.decode_budget.DecodeBudget)
    max_pixels: int = Field(
        60_000_000, description='images with more pixels (read from the header) are refused as decompression bombs')
    min_side: int = Field(32, description='images with a side below this are refused as too small to match')
    max_file_bytes: int = Field(50_000_000, description='files and downloads larger than this are refused')
    max_jpeg_scans: int = Field(
        100, ge=1, description="refuse progressive JPEGs with more scans than this (each scan is one more "
                               "pass over the image: thousands cost minutes of CPU); raise it only if real "
                               "photos are refused as too_many_scans")
    decode_max_side: int = Field(
        1280, ge=32, description="longest side images are decoded and kept at (JPEG draft mode, then area "
                                 "resampling): lower saves memory and CPU, higher keeps detail for content-box "
                                 "crops (448 lost 0.008 cluster F1 on the benchmark, collages and screenshots "
                                 "first; 1280, its largest side, changes nothing there)")
    decode_budget_pixels: int = Field(
        120_000_000, ge=1, description="pixels decompressed at once per process, all threads together "
                                       "(about 4 bytes each while decoding): lower it when a pod nears its "
                                       "memory limit, raise it for more parallel decodes of large images")

    # matching
    candidates_k: int = Field(
        8, description='vector-index candidates verified per image: raise to find copies in crowded clusters, slower')
    query_candidates_k: int = Field(
        20, ge=1, description="vector-index candidates verified per outside query (memetrace query, POST "
                              "/v1/search): raise to find copies that look-alikes outrank (collage tiles, small "
                              "crops), at more time per query")
    candidate_min_similarity: float = Field(
        0.45, description="descriptor similarity below which a candidate is not verified: lower to find harder "
                          "copies, slower")
    ratio_test: float = Field(
        0.8, description="Lowe's ratio for SIFT matches: lower is stricter (fewer false matches, fewer copies found)")
    min_inliers: int = Field(
        10, description="keypoints RANSAC must verify for a match: raise to link fewer different images, lower to "
                        "find harder copies")
    ransac_reproj_px: float = Field(
        6.0, description="RANSAC reprojection tolerance (pixels at the SIFT working size): higher accepts looser "
                         "geometry (more warped copies, more chance links)")
    min_coverage: float = Field(
        0.6, description="share of one image's keypoints the match must explain: lower finds smaller parts "
                         "(collage tiles, tight crops) and links more different images")
    same_frame_min_coverage: float = Field(
        0.7, description="share of both images' keypoints an unmoved, same-size match must explain (two "
                         "posts sharing only an app frame): raise to link fewer screenshots of one app")
    overlay_min_coverage: float = Field(
        0.8, gt=0, le=1, description="share of one image's keypoints that still makes an unmoved, same-size pair "
                                     "a copy below same_frame_min_coverage, when no block of both images is left "
                                     "unmatched (a caption or sticker drawn over the other): lower finds more "
                                     "captioned copies, raise it to link fewer screenshots of one app")
    overlay_min_agreement: float = Field(
        0.35, ge=0, le=1, description="for an unmoved, same-size pair whose inliers lie in a small part of the "
                                     "picture: share of the pixels around the unmatched keypoints where the two "
                                     "thumbnails agree that makes it a caption or sticker over a smooth photo (a "
                                     "copy) and not two posts of one app: lower finds more captioned copies of "
                                     "smooth photos, raise it to link fewer screenshots of one app")
    coverage_radius: float = Field(
        0.05, description="how near a matched point a keypoint counts as explained, share of the longest side: "
                          "higher makes both coverage tests easier to pass")
    low_texture_points: int = Field(
        50, ge=0, description="below this many keypoints on either image of a pair (skies, smooth photos), a pair "
                              "RANSAC rejects is judged whole-image by the two low_texture_min_* thresholds: raise "
                              "to apply that rule to more pairs, 0 turns it off")
    low_texture_min_similarity: float = Field(
        0.8, ge=0, le=1, description="global descriptor cosine a low-texture pair needs: lower finds more edited "
                                     "copies of smooth photos and links more look-alike ones")
    low_texture_min_agreement: float = Field(
        0.85, ge=-1, le=1, description="thumbnail correlation (picture and detail) a low-texture pair needs: "
                                       "lower finds more edited copies of smooth photos, higher links fewer "
                                       "different skies and gradients")
    prepare_threads: int = Field(2, ge=1, le=256, description="threads for decoding and SIFT")
    match_threads: int = Field(2, ge=1, le=256, description="threads verifying candidates (FAISS + RANSAC)")
    match_cache_mb: int = Field(
        256, ge=0, description="MB of prepared keypoints (xy, size and RootSIFT, 524 B a keypoint: 0.12 MB an image on the "
                               "benchmark, 0.3 at most) the matcher and the clusterer's tree verification each keep for "
                               "the images verified again and again: lower it when a pod nears its memory limit, at the "
                               "cost of reading them again; 0 = none kept")

    # clustering
    cluster_algorithm: Literal["components", "louvain"] = Field(
        "components", description="components = every verified chain is one cluster; louvain splits weakly linked "
                                  "groups")
    cluster_every_s: float = Field(60.0, gt=0, description="clusterer service: seconds between two reclusterings")
    cluster_top_n: int = Field(10, ge=1, le=100, description="fastest-growing clusters exported as metrics "
                                                           "(bounds the label cardinality)")

    # feature store (keypoints, thumbnails)
    feature_store: Literal["local", "s3"] = Field(
        "local", description="local = data_dir/features; s3 = an S3-compatible bucket (MinIO, AWS)")
    s3_endpoint_url: str = Field("", description="e.g. http://minio:9000; empty = AWS S3")
    s3_bucket: str = Field("memetrace", description="created on first use when missing")
    s3_prefix: str = Field("features", description="key prefix inside the bucket; empty = none")
    s3_region: str = Field("us-east-1", description='S3 region')
    s3_access_key_id: str = Field("", description="empty = boto3's default chain (AWS_*, ~/.aws, role)")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret key; empty = boto3's default chain")
    s3_connect_timeout: float = Field(5.0, description="seconds to open a connection")
    s3_read_timeout: float = Field(60.0, description="seconds to wait for a response")
    s3_max_attempts: int = Field(5, ge=1, description="tries per request, first included (botocore retries)")

    # streaming ingest (Kafka)
    kafka_bootstrap_servers: str = Field("localhost:9092", description="comma-separated host:port list")
    kafka_posts_topic: str = Field("memetrace.posts", description='topic of the posts the ingest consumes')
    kafka_images_topic: str = Field("memetrace.images", description='topic of the image events the ingest publishes')
    kafka_deadletter_topic: str = Field(
        "memetrace.deadletter", description="topic of the messages a service could not process, with the reason in "
                                            "headers")
    kafka_matches_topic: str = Field(
        "memetrace.matches", description='topic of the verified edges the matcher publishes')
    kafka_ingest_group_id: str = Field("memetrace-ingest", description="consumer group of the ingest workers")
    kafka_match_group_id: str = Field("memetrace-match", description="consumer group of the matcher service")
    kafka_cluster_group_id: str = Field("memetrace-cluster", description="consumer group of the clusterer service")
    kafka_topic_partitions: int = Field(6, ge=1, description="partitions of topics the ingest creates if missing")
    kafka_session_timeout_ms: int = Field(10_000, description="a dead worker's partitions move after this")
    kafka_max_poll_interval_ms: int = Field(
        300_000, description="a batch must finish within this, or the group hands its partitions away")
    kafka_auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description='where a new consumer group starts: earliest = the whole topic')
    ingest_batch_size: int = Field(32, ge=1, description="posts per poll (bounded buffer: backpressure)")
    retry_max_s: float = Field(30.0, gt=0, description="every service: cap of the backoff while a dependency "
                                                       "(Kafka, Milvus, S3) is down")
    poison_after_retries: int = Field(
        5, ge=1, description="every service: a write failing this many times in a row on the same message "
                             "while its dependency answers other calls makes the message poison (dead-lettered)")
    fault_kill_before_commit: int = Field(
        0, ge=0, description="TEST ONLY fault injection: SIGKILL the service just before its N-th offset commit "
                             "(outputs flushed, offsets not committed); 0 = off, never set it in production")
    match_batch_size: int = Field(32, ge=1, description="image events the matcher service verifies per poll")

    # downloading post images (memetrace.fetch.FetchPolicy)
    fetch_allow_private_networks: bool = Field(
        False, description="1 = allow loopback/private addresses (tests, demos); never in production")
    fetch_trusted_networks: list[str] = Field(
        default_factory=list, description='JSON list of CIDRs, e.g. ["10.1.0.0/16"]')
    fetch_connect_timeout: float = Field(5.0, description='seconds to open a connection to an image host')
    fetch_read_timeout: float = Field(15.0, description='seconds without a byte from an image host')
    fetch_request_timeout: float = Field(
        60.0, description='seconds for a whole download, redirects and retries included')
    fetch_retries: int = Field(2, description='retries of a download after a timeout, a cut connection or a 5xx')
    fetch_max_in_flight: int = Field(
        16, ge=1, description="downloads at once per process; also how many downloaded bodies the ingest worker "
                              "holds ahead of decoding (memory: this x MEMETRACE_MAX_FILE_BYTES at most)")
    fetch_per_host: int = Field(4, description='downloads at once per host')

    # Prometheus /metrics (and /healthz, /readyz) of the ingest, match and cluster services
    metrics_port: int = Field(0, ge=0, description="port of /metrics, /healthz and /readyz; 0 = off")
    metrics_host: str = Field("0.0.0.0", description='address of /metrics, /healthz and /readyz')

    # query API (memetrace serve)
    api_host: str = Field("127.0.0.1", description='address the query API listens on (0.0.0.0 in containers)')
    api_port: int = Field(8000, ge=1, le=65535, description="port of the query API")
    api_token: SecretStr | None = Field(None, description="bearer token the API requires; empty = no auth")
    api_max_upload_bytes: int = Field(20_000_000, ge=1, description="largest image accepted by POST /v1/search")
    api_search_concurrency: int = Field(2, ge=1, description="searches (decode, embed, SIFT, verify) run at once")
    api_read_consistency: Literal["Strong", "Bounded"] = Field(
        "Bounded", description="Milvus read consistency of the API's reads (its searches and the rows that describe "
                               "the answers): Bounded answers at once and may miss what was stored in the last seconds; "
                               "Strong sees every write but waits for the server's time tick (about 0.2 s a read on a "
                               "Milvus server, docs/scale.md)")
    api_search_queue: int = Field(8, ge=0, description="searches receiving their image or waiting for a "
                                  "slot; beyond, 503 busy at once")
    api_body_timeout_s: float = Field(15.0, gt=0, description="a request body must arrive within this, else 408")
    api_header_timeout_s: float = Field(10.0, gt=0, description="a request's line and headers must arrive within "
                                        "this (from connecting, or the previous answer), else the connection is closed")
    api_max_connections: int = Field(512, ge=1, description="open connections; beyond, uvicorn answers 503")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _RenamedEnv(settings_cls), dotenv_settings, file_secret_settings

    def resolved_milvus_uri(self) -> str:
        return self.milvus_uri or str(self.data_dir / "milvus.db")

    def resolved_cluster_state_path(self) -> Path:
        return self.cluster_state_path or self.data_dir / "cluster-state.db"
