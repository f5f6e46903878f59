"""Prometheus metric definitions: the one place every metric of the node is declared.

Other modules import the metric objects from here and update them; the HTTP exporter is
:mod:`lungnode.ops.server`. Label values never carry patient data (AE titles, reasons, states,
stage names only).

Several processes (listener processes, worker processes, extra worker units on the same machine)
update the same metrics, so the node runs prometheus_client in *multiprocess mode*: every process
writes its values to memory-mapped files in one shared folder and the exporter sums them.
:func:`setup_multiprocess` chooses the folder (``[metrics] multiprocess_dir``, else
``$PROMETHEUS_MULTIPROC_DIR``, else ``$RUNTIME_DIRECTORY/metrics`` under systemd, else
``<storage.root>/.metrics``), exports it as ``PROMETHEUS_MULTIPROC_DIR`` so that child processes
inherit it, removes the files of processes that are no longer alive, and switches this process to
multiprocess values even when prometheus_client was imported before. ``lungnode run`` calls it
first thing, before it starts any child process.

Who updates what
----------------
* listener: ``INSTANCES_RECEIVED``, ``INSTANCES_REJECTED``, ``BYTES_RECEIVED``, ``ASSOCIATIONS``
* completion: ``SERIES_COMPLETED``, ``STAGE_SECONDS{stage="receive_to_complete"}``
* worker: ``STAGE_SECONDS{stage="queue_wait"|"inference"|"build"}``, :func:`worker_heartbeat`
  every poll, :func:`sample_gpu_memory` after each job
* delivery: ``STAGE_SECONDS{stage="send"}``, ``DELIVERIES``, ``END_TO_END_SECONDS``
* exporter only (from the database and the disk at each scrape; nobody else sets them):
  ``JOBS``, ``DELIVERY_QUEUE``, ``FREE_DISK_BYTES``, ``HEALTH``
* retention: ``RETENTION_DELETED_BYTES``, ``RETENTION_RUNS``
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics import MetricWrapperBase

ENV_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"

#: Buckets for per-stage seconds (receive → complete can take a quiet period of 30 s or more).
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

#: Stage label values of :data:`STAGE_SECONDS`.
STAGES = ("receive_to_complete", "queue_wait", "inference", "build", "send")

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
JOBS = Gauge("lungnode_jobs", "Jobs by state (from the database at each scrape)", ["state"],
             multiprocess_mode="livemax")
DELIVERY_QUEUE = Gauge("lungnode_delivery_rows", "Deliveries by state (from the database at each scrape)",
                       ["state"], multiprocess_mode="livemax")
STAGE_SECONDS = Histogram(
    "lungnode_stage_seconds",
    "Seconds per stage: receive_to_complete, queue_wait, inference, build, send",
    ["stage"], buckets=STAGE_BUCKETS)
END_TO_END_SECONDS = Histogram(
    "lungnode_end_to_end_seconds",
    "Last instance received to results acknowledged by the PACS", buckets=STAGE_BUCKETS)
DELIVERIES = Counter(
    "lungnode_deliveries_total", "Result delivery attempts by outcome (sent, retry, dead, shadow)",
    ["outcome"])
FREE_DISK_BYTES = Gauge("lungnode_free_disk_bytes", "Free bytes on the storage root",
                        multiprocess_mode="livemax")
GPU_MEMORY_BYTES = Gauge("lungnode_gpu_memory_bytes",
                         "GPU memory: peak allocated by the worker's last job (per worker process)",
                         multiprocess_mode="liveall")
WORKER_HEARTBEAT = Gauge("lungnode_worker_heartbeat_timestamp_seconds",
                         "Unix time of each live worker process's last poll of the job table",
                         multiprocess_mode="liveall")
HEALTH = Gauge("lungnode_health_ok", "1 when a health check passed at the last /healthz or scrape",
               ["check"], multiprocess_mode="livemax")
RETENTION_DELETED_BYTES = Counter("lungnode_retention_deleted_bytes_total",
                                  "Bytes deleted by retention, by kind (instances, results)", ["kind"])
RETENTION_RUNS = Counter("lungnode_retention_runs_total", "Retention runs by outcome (ok, error)",
                         ["outcome"])

#: Every metric object above (re-initialised when the process switches to multiprocess mode).
ALL_METRICS: tuple[MetricWrapperBase, ...] = (
    INSTANCES_RECEIVED, INSTANCES_REJECTED, BYTES_RECEIVED, ASSOCIATIONS, SERIES_COMPLETED, JOBS,
    DELIVERY_QUEUE, STAGE_SECONDS, END_TO_END_SECONDS, DELIVERIES, FREE_DISK_BYTES, GPU_MEMORY_BYTES,
    WORKER_HEARTBEAT, HEALTH, RETENTION_DELETED_BYTES, RETENTION_RUNS,
)

_FILE_RE = re.compile(r"^[a-z_]+_(\d+)\.db$")


def multiprocess_dir() -> Path | None:
    """The shared metrics folder of this process, or ``None`` in single-process mode."""
    value = os.environ.get(ENV_MULTIPROC) or os.environ.get(ENV_MULTIPROC.lower())
    return Path(value) if value else None


def default_multiprocess_dir(storage_root: str | Path, configured: str = "") -> Path:
    """The folder :func:`setup_multiprocess` uses.

    Parameters
    ----------
    storage_root:
        ``[storage] root``.
    configured:
        ``[metrics] multiprocess_dir`` (wins when set).

    Returns
    -------
    Path
        The configured folder, else ``$PROMETHEUS_MULTIPROC_DIR``, else ``$RUNTIME_DIRECTORY/metrics``
        (systemd), else ``<storage_root>/.metrics``.
    """
    if configured:
        return Path(configured)
    env = multiprocess_dir()
    if env is not None:
        return env
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / "metrics"
    return Path(storage_root) / ".metrics"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def setup_multiprocess(folder: str | Path, *, wipe: bool = True) -> Path:
    """Switch this process (and the children it starts later) to multiprocess metrics in ``folder``.

    Parameters
    ----------
    folder:
        The shared folder (created if missing; must be on a local filesystem).
    wipe:
        Remove the files of processes that are not alive (do this once, in the process that starts
        the others, before it starts them). Files of live processes, e.g. worker units started
        beside the node, are kept.

    Returns
    -------
    Path
        The folder.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    if wipe:
        for file in path.glob("*.db"):
            match = _FILE_RE.match(file.name)
            if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
                file.unlink(missing_ok=True)
    os.environ[ENV_MULTIPROC] = str(path)
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
        for metric in ALL_METRICS:
            if metric._is_parent():
                with metric._lock:
                    metric._metrics.clear()
            else:
                metric._metric_init()
    return path


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of a child process that exited (call from its supervisor)."""
    folder = multiprocess_dir()
    if folder is not None:
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, str(folder))


def exposition_registry() -> CollectorRegistry:
    """The registry to expose: every process's metrics in multiprocess mode, else this process's."""
    folder = multiprocess_dir()
    if folder is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    return registry


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of all metrics and its content type."""
    return generate_latest(exposition_registry()), CONTENT_TYPE_LATEST


def worker_heartbeat(now: float | None = None) -> None:
    """Record that this worker process is alive and polling (call once per poll loop)."""
    WORKER_HEARTBEAT.set(time.time() if now is None else now)


def worker_heartbeats() -> dict[str, float]:
    """Last heartbeat per live worker process (``pid`` label in multiprocess mode, else ``self``)."""
    found: dict[str, float] = {}
    registry = exposition_registry()
    for family in registry.collect():
        if family.name != WORKER_HEARTBEAT._name:
            continue
        for sample in family.samples:
            if sample.value > 0:
                found[sample.labels.get("pid", "self")] = sample.value
    return found


def sample_gpu_memory() -> int | None:
    """Set :data:`GPU_MEMORY_BYTES` to torch's peak allocated CUDA memory since the last call.

    The peak is then reset to what is allocated at that moment (model weights stay counted), so
    each call reports the largest allocation during the work since the previous one (call it after
    each job). Checked on an H100 by ``tests/ops/test_gpu_metrics.py``.

    Returns
    -------
    int or None
        The bytes, or ``None`` when torch is not loaded in this process or has no CUDA device.
    """
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = int(torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    GPU_MEMORY_BYTES.set(peak)
    return peak


def setup_from_config(storage_root: str | Path, multiprocess_dir_setting: str = "", *,
                      wipe: bool = True) -> Path:
    """:func:`setup_multiprocess` in :func:`default_multiprocess_dir` (what ``lungnode run`` calls).

    Parameters
    ----------
    storage_root:
        ``[storage] root``.
    multiprocess_dir_setting:
        ``[metrics] multiprocess_dir``.
    wipe:
        ``True`` in ``lungnode run`` (the process that starts the others); ``False`` in a
        stand-alone ``lungnode worker`` that joins a node's folder.

    Returns
    -------
    Path
        The folder in use.
    """
    return setup_multiprocess(default_multiprocess_dir(storage_root, multiprocess_dir_setting), wipe=wipe)


def sweep_dead_processes() -> int:
    """Forget the live gauges of processes that exited without being marked dead; return how many."""
    folder = multiprocess_dir()
    if folder is None:
        return 0
    dead = set()
    for file in folder.glob("gauge_live*_*.db"):
        match = _FILE_RE.match(file.name)
        if match and not _pid_alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        mark_process_dead(pid)
    return len(dead)
