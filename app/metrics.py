"""Prometheus metrics. Label values come from small fixed sets only."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CALLBACKS = Counter(
    "imagetasks_callbacks_total",
    "Webhook deliveries by outcome (applied, duplicate, stale, anomaly, confirming, rejected).",
    ["outcome"],
)
CALLBACK_SECONDS = Histogram(
    "imagetasks_callback_handling_seconds",
    "Time to handle one webhook delivery.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CALLBACK_BATCHES_FAILED = Counter(
    "imagetasks_callback_batches_failed_total",
    "Batched callback statements that failed; their callbacks took the general path.",
)
SUBMISSIONS = Counter(
    "imagetasks_submissions_total",
    "POST /tasks outcomes (accepted, replayed, refused, unavailable, unknown).",
    ["outcome"],
)
PROVIDER_SECONDS = Histogram(
    "imagetasks_provider_request_seconds",
    "Latency of calls to StarMagic by operation (submit, query).",
    ["operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DOWNLOADS = Counter(
    "imagetasks_downloads_total",
    "Download attempts by outcome (stored, retry, renewed, failed).",
    ["outcome"],
)
BYTES_STORED = Counter("imagetasks_image_bytes_stored_total", "Bytes of images stored.")
QUEUE_DEPTH = Gauge("imagetasks_download_queue_depth", "Downloads queued (image status pending).")
QUEUE_OLDEST = Gauge(
    "imagetasks_download_queue_oldest_seconds", "Age of the oldest queued download."
)
COMPLETION_TO_STORED = Histogram(
    "imagetasks_completion_to_stored_seconds",
    "Time from a task's completion to its image being stored.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
)
RECONCILER_QUERIES = Counter(
    "imagetasks_reconciler_queries_total",
    "Query API calls made by the reconciler, by outcome (ok, not_found, error).",
    ["outcome"],
)
IMAGES_MISSING = Counter(
    "imagetasks_images_missing_total",
    "Images recorded as stored whose object is missing from the storage (data loss).",
)
WEBHOOK_DELIVERIES = Counter(
    "imagetasks_webhook_attempts_total",
    "Webhook delivery attempts to callers by outcome (delivered, retry, failed, gone).",
    ["outcome"],
)
WEBHOOK_ENDPOINTS_DISABLED = Counter(
    "imagetasks_webhook_endpoints_disabled_total",
    "Webhook endpoints disabled by the service (gone: answered 410; failing: failed too long).",
    ["reason"],
)
