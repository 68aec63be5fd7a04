"""The ingest worker's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from memetrace.metrics import StreamMetrics, BATCH_BUCKETS, ITEM_BUCKETS


class IngestMetrics(StreamMetrics):
    """Everything the ingest worker reports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        r = registry
        self.posts_consumed = Counter("memetrace_posts_consumed_total", "posts-topic messages consumed", registry=r)
        self.images_stored = Counter("memetrace_images_stored_total", "new images written to Milvus", registry=r)
        self.duplicates = Counter("memetrace_duplicates_total",
                                  "posts whose image was already stored (same bytes)", registry=r)
        self.occurrences = Counter("memetrace_occurrences_total", "post occurrences written", registry=r)
        self.download_failures = Counter("memetrace_download_failures_total", "failed downloads by reason",
                                         ["reason"], registry=r)
        self.downloaded_bytes = Counter("memetrace_downloaded_bytes_total", "image bytes downloaded", registry=r)
        self.download_seconds = Histogram("memetrace_download_seconds", "one URL, retries included",
                                          buckets=ITEM_BUCKETS, registry=r)
        self.decode_seconds = Histogram("memetrace_decode_seconds", "decode + regions + thumbnail of one image",
                                        buckets=ITEM_BUCKETS, registry=r)
        self.sift_seconds = Histogram("memetrace_sift_seconds", "SIFT keypoints of one image",
                                      buckets=ITEM_BUCKETS, registry=r)
        self.embed_batch_seconds = Histogram("memetrace_embed_batch_seconds", "embedding one batch of images",
                                             buckets=BATCH_BUCKETS, registry=r)
        self.milvus_write_seconds = Histogram("memetrace_milvus_write_seconds", "one Milvus upsert call",
                                              buckets=ITEM_BUCKETS, registry=r)
        self.device = Gauge("memetrace_device_info", "1 for the torch device the embedder runs on",
                            ["device"], registry=r)
