"""Configuration of operations: ``[metrics]``, ``[retention]`` and ``[logging]``."""

from __future__ import annotations

from dataclasses import dataclass

from lungnode.config.checks import check_ip, check_range
from lungnode.config.typed_toml import ConfigError


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics and ``/healthz``."""

    #: Serve ``/metrics`` and ``/healthz`` over HTTP.
    enabled: bool = True
    #: Address of the HTTP endpoint (loopback by default; it has no authentication).
    bind: str = "127.0.0.1"
    #: TCP port of the HTTP endpoint.
    port: int = 9110
    #: Local folder where processes share metric files; empty: ``$PROMETHEUS_MULTIPROC_DIR``, else
    #: ``$RUNTIME_DIRECTORY/metrics`` (systemd), else ``<storage.root>/.metrics``. Never on NFS.
    multiprocess_dir: str = ""
    #: A local worker whose last poll of the job table is older than this (s) counts as dead.
    worker_stale_s: float = 60.0
    #: ``/healthz`` fails when a due job waited this long (s) and no job started or finished meanwhile.
    queue_stall_s: float = 900.0

    def validate(self, key: str) -> None:
        check_ip(f"{key}.bind", self.bind)
        check_range(f"{key}.port", self.port, 1, 65535)
        check_range(f"{key}.worker_stale_s", self.worker_stale_s, 1, 86400)
        check_range(f"{key}.queue_stall_s", self.queue_stall_s, 1, 7 * 86400)


@dataclass(frozen=True)
class RetentionConfig:
    """Cleanup of received instances and results."""

    #: Delete data older than this many days (0 = keep forever).
    keep_days: int = 30
    #: Also delete oldest first while free disk (MiB) is below this; 0 = off.
    free_disk_target_mb: int = 0
    #: Hours between cleanup runs.
    interval_h: float = 6.0
    #: Run the scheduled cleanup inside ``lungnode run`` (``lungnode cleanup`` works either way).
    scheduled: bool = True

    def validate(self, key: str) -> None:
        check_range(f"{key}.keep_days", self.keep_days, 0)
        check_range(f"{key}.free_disk_target_mb", self.free_disk_target_mb, 0)
        check_range(f"{key}.interval_h", self.interval_h, 0.01)


@dataclass(frozen=True)
class LoggingConfig:
    """Logging."""

    #: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``. Patient data appears only at DEBUG.
    level: str = "INFO"

    def validate(self, key: str) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{key}.level", self.level, "DEBUG, INFO, WARNING or ERROR")
