"""Health checks behind ``/healthz``: listener, database, disk and workers.

Each check returns a :class:`CheckResult`; :func:`run_checks` runs them in parallel threads with a
deadline (a hung database connection counts as a failure, not as a hung probe) and sets the
``lungnode_health_ok{check=…}`` gauge. The node is healthy when every check passes.

Checks
------
``database``
    A write in a real table, rolled back, on a *fresh* connection (SQLite: a new connection to the
    file, so a file made read-only or deleted is noticed even while pooled connections still have it
    open; PostgreSQL: the pool with pre-ping).
``disk``
    Free space on the storage root above ``[storage] min_free_disk_mb`` (below it the listener
    refuses instances) and a file can be created in ``<root>/.tmp``.
``listener``
    The DIMSE port is in LISTEN state (only in the process that runs the listener).
``workers``
    When this machine runs local workers: at least ``[jobs] local_workers`` worker processes polled
    within ``[metrics] worker_stale_s``. Always: jobs that are due do not wait for longer than
    ``[metrics] queue_stall_s`` without any job starting or finishing (no worker anywhere is taking
    work).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select

from lungnode.config import Config
from lungnode.ops import metrics
from lungnode.storage.db import Database
from lungnode.storage.models import Job, aware, utcnow

#: Seconds a whole health probe may take; unfinished checks count as failed.
DEADLINE_S = 10.0


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one health check."""

    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True)
class HealthReport:
    """All checks of one probe."""

    checks: tuple[CheckResult, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(c.ok for c in self.checks)

    def to_json(self) -> str:
        """JSON body of ``/healthz``: ``{"status": "ok"|"unhealthy", "checks": {...}}``."""
        body: dict[str, Any] = {
            "status": "ok" if self.ok else "unhealthy",
            "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"}
                       for c in self.checks},
        }
        return json.dumps(body, indent=1, sort_keys=True)


Check = Callable[[], CheckResult]



def check_database(db: Database, timeout_s: float = 5.0) -> CheckResult:
    """Prove the database accepts writes (see module docstring)."""
    try:
        if db.is_sqlite:
            path = db.url.split("///", 1)[1] if "///" in db.url else ""
            if not path or path == ":memory:":
                db.ping()
            else:
                if not Path(path).is_file():
                    return CheckResult("database", False, "database file is missing")
                # SQLite reuses a file descriptor this process still holds for the same file, so
                # a new connection alone would not notice a file made read-only: open it anew.
                for name in (path, f"{path}-wal", f"{path}-shm"):
                    if name == path or Path(name).exists():
                        os.close(os.open(name, os.O_RDWR))
                conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("DELETE FROM health_probe")
                    conn.execute("INSERT INTO health_probe (id, at) VALUES (1, ?)",
                                 (utcnow().isoformat(),))
                    conn.execute("ROLLBACK")
                finally:
                    conn.close()
        else:
            db.ping()
    except OSError as exc:
        return CheckResult("database", False, f"not writable: {exc.strerror}: {exc.filename}"[:300])
    except Exception as exc:
        return CheckResult("database", False, f"not writable: {type(exc).__name__}: {exc}"[:300])
    return CheckResult("database", True, "writable")


def check_disk(root: Path, min_free_mb: int) -> CheckResult:
    """Free space above the watermark and a file can be created under the storage root."""
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return CheckResult("disk", False, f"storage root unusable: {exc.strerror}")
    metrics.FREE_DISK_BYTES.set(free)
    free_mb = free // (1024 * 1024)
    if min_free_mb and free_mb < min_free_mb:
        return CheckResult("disk", False, f"free {free_mb} MiB below the watermark {min_free_mb} MiB")
    probe = root / ".tmp" / f"healthz-{os.getpid()}-{threading.get_ident()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        probe.unlink()
    except OSError as exc:
        return CheckResult("disk", False, f"cannot write under the storage root: {exc.strerror}")
    return CheckResult("disk", True, f"free {free_mb} MiB (watermark {min_free_mb} MiB)")


def _listening_ports() -> set[int] | None:
    """TCP ports in LISTEN state in this network namespace (``/proc/net/tcp*``); None if unreadable."""
    ports: set[int] = set()
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports if found else None


def check_listener(host: str, port: int, timeout_s: float = 2.0) -> CheckResult:
    """The DIMSE port is in LISTEN state.

    Read from ``/proc/net/tcp`` rather than by connecting: a probe connection would occupy one of
    the listener's association slots until its ACSE timeout (and count as a failed TLS handshake
    with TLS on). Without ``/proc``, a TCP connection is tried instead.
    """
    ports = _listening_ports()
    if ports is not None:
        if port in ports:
            return CheckResult("listener", True, f"port {port} listening")
        return CheckResult("listener", False, f"nothing listens on port {port}")
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    try:
        with socket.create_connection((target, port), timeout=timeout_s):
            pass
    except OSError as exc:
        return CheckResult("listener", False, f"{target}:{port} not accepting: {exc.strerror or exc}")
    return CheckResult("listener", True, f"{target}:{port} accepting")


def check_workers(db: Database, *, local_workers: int, stale_s: float, stall_s: float,
                  now: dt.datetime | None = None) -> CheckResult:
    """Local worker heartbeats are fresh and the job queue is not stalled."""
    now = now or utcnow()
    problems: list[str] = []
    notes: list[str] = []
    if local_workers > 0:
        beats = metrics.worker_heartbeats()
        fresh = [pid for pid, at in beats.items() if now.timestamp() - at <= stale_s]
        notes.append(f"{len(fresh)} live worker(s)")
        if len(fresh) < local_workers:
            problems.append(f"{len(fresh)} of {local_workers} local worker(s) polled in the last "
                            f"{stale_s:g} s")
    try:
        with db.session() as s:
            oldest_due = aware(s.scalar(select(func.min(Job.not_before)).where(
                Job.state == "queued", Job.not_before <= now)))
            if oldest_due is not None and (now - oldest_due).total_seconds() > stall_s:
                horizon = now - dt.timedelta(seconds=stall_s)
                progressed = s.scalar(select(func.count()).select_from(Job).where(
                    or_(Job.started_at >= horizon, Job.finished_at >= horizon)))
                if not progressed:
                    waited = int((now - oldest_due).total_seconds())
                    problems.append(f"a due job has waited {waited} s and no job started or "
                                    f"finished in the last {stall_s:g} s")
    except Exception as exc:
        problems.append(f"cannot read the job table: {type(exc).__name__}")
    if problems:
        return CheckResult("workers", False, "; ".join(problems))
    return CheckResult("workers", True, ", ".join(notes) or "queue moving")


def standard_checks(config: Config, db: Database, *, listener: bool, local_workers: int) -> list[Check]:
    """The checks of a node process.

    Parameters
    ----------
    config:
        The configuration.
    db:
        The database.
    listener:
        Whether this process hosts the DIMSE listener (``lungnode run``).
    local_workers:
        Worker processes expected to heartbeat into this machine's metrics folder.
    """
    root = config.storage.root_path
    m = config.metrics
    checks: list[Check] = [
        lambda: check_database(db),
        lambda: check_disk(root, config.storage.min_free_disk_mb),
        lambda: check_workers(db, local_workers=local_workers, stale_s=m.worker_stale_s,
                              stall_s=m.queue_stall_s),
    ]
    if listener:
        checks.append(lambda: check_listener(config.node.bind, config.node.port))
    return checks


def run_checks(checks: Sequence[Check], deadline_s: float = DEADLINE_S) -> HealthReport:
    """Run ``checks`` in parallel; a check still running at the deadline fails as ``timed out``."""
    results: list[CheckResult | None] = [None] * len(checks)

    def _run(i: int, check: Check) -> None:
        start = time.monotonic()
        try:
            result = check()
        except Exception as exc:  # a broken check is a failed check
            result = CheckResult(f"check{i}", False, f"{type(exc).__name__}: {exc}"[:300])
        results[i] = CheckResult(result.name, result.ok, result.detail,
                                 round(time.monotonic() - start, 4))

    threads = [threading.Thread(target=_run, args=(i, c), daemon=True, name=f"healthz-{i}")
               for i, c in enumerate(checks)]
    for t in threads:
        t.start()
    end = time.monotonic() + deadline_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    final = tuple(r if r is not None else CheckResult(f"check{i}", False, f"timed out after {deadline_s:g} s")
                  for i, r in enumerate(results))
    for r in final:
        metrics.HEALTH.labels(r.name).set(1 if r.ok else 0)
    return HealthReport(final)
