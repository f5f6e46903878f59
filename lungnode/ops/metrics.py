"""Prometheus metric definitions: the one place every metric of the node is declared.

Other modules import the metric objects from here and update them; the HTTP exporter and
multi-process aggregation (listener and worker processes) are set up by :mod:`lungnode.ops`.
Label values never carry patient data (AE titles, reasons, states, stage names only).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Buckets for per-stage seconds (receive → complete can take a quiet period of 30 s or more).
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

INSTANCES_RECEIVED = Counter(
    "lungnode_instances_received_total", "SOP instances stored and acknowledged", ["calling_ae"])
INSTANCES_REJECTED = Counter(
    "lungnode_instances_rejected_total", "C-STORE requests answered with a failure status", ["reason"])
BYTES_RECEIVED = Counter("lungnode_bytes_received_total", "Bytes of stored instances")
ASSOCIATIONS = Counter(
    "lungnode_associations_total", "Associations by outcome (accepted, rejected reason, aborted)",
    ["outcome"])
SERIES_COMPLETED = Counter(
    "lungnode_series_completed_total", "Series that completed, by decision (include/exclude/own)",
    ["decision"])
JOBS = Gauge("lungnode_jobs", "Jobs by state", ["state"], multiprocess_mode="livemax")
STAGE_SECONDS = Histogram(
    "lungnode_stage_seconds",
    "Seconds per stage: receive_to_complete, queue_wait, inference, build, send",
    ["stage"], buckets=STAGE_BUCKETS)
END_TO_END_SECONDS = Histogram(
    "lungnode_end_to_end_seconds",
    "Last instance received to results acknowledged by the PACS", buckets=STAGE_BUCKETS)
DELIVERIES = Counter(
    "lungnode_deliveries_total", "Result deliveries by outcome (sent, retry, dead)", ["outcome"])
FREE_DISK_BYTES = Gauge("lungnode_free_disk_bytes", "Free bytes on the storage root",
                        multiprocess_mode="livemax")
GPU_MEMORY_BYTES = Gauge("lungnode_gpu_memory_bytes", "GPU memory allocated by the inference worker",
                         multiprocess_mode="livemax")
