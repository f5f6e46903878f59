"""Retention: delete old received series and sent results, oldest first, never what is still needed.

Units of deletion
-----------------
``series``
    A received series: its instance files and its ``instances``/``series`` rows (and the study and
    patient rows once nothing refers to them). Age: the last instance received.
``results``
    The output objects (SEG, SR, SC) of a finished job: files and ``outputs`` rows. The job, its
    deliveries and the audit trail stay. Age: the newest of the job's end, its outputs and its
    deliveries.

Never deleted
-------------
A series still receiving; a series or results with a job ``queued``, ``running`` or ``held``
(held results are unsent until released); a series or results with a delivery ``pending``
(unsent). ``sent`` and ``dead`` deliveries do not protect. Audit events are never deleted.

Policy
------
Everything older than ``[retention] keep_days`` goes; and while free disk (MiB) is below
``[retention] free_disk_target_mb`` more units go, oldest first, even younger ones. The plan is
made from the database; each unit is then re-checked and deleted in its own transaction (the
series row locked on PostgreSQL), rows first, then files; a file modified after the unit's age
(re-sent meanwhile) is left alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from lungnode.config import Config
from lungnode.ops import metrics
from lungnode.storage.audit import record_event
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Delivery, Instance, Job, Output, Patient, Series, Study, aware, utcnow

log = logging.getLogger(__name__)

#: Job states whose series and results must stay.
PROTECTING_JOB_STATES = ("queued", "running", "held")
#: Seconds a file's mtime may lie after a unit's age before it counts as re-written.
MTIME_SLACK_S = 120.0



@dataclass(frozen=True)
class Unit:
    """One thing retention may delete."""

    kind: str  # "series" or "results"
    key: str  # SeriesInstanceUID or job id
    age_at: dt.datetime
    files: tuple[str, ...]
    size_bytes: int
    #: Why it is in the plan: "age" (older than keep_days) or "disk" (free disk below target).
    reason: str = ""

    def as_dict(self, now: dt.datetime) -> dict[str, Any]:
        """JSON-friendly form for ``lungnode cleanup --json``."""
        return {"kind": self.kind, "key": self.key, "age_at": self.age_at.isoformat(),
                "age_days": round((now - self.age_at).total_seconds() / 86400, 2),
                "files": len(self.files), "bytes": self.size_bytes, "reason": self.reason}


@dataclass(frozen=True)
class CleanupResult:
    """What a cleanup run deleted (or, in a dry run, would delete)."""

    units: tuple[Unit, ...]
    deleted_files: int
    deleted_bytes: int
    skipped: tuple[str, ...]
    dry_run: bool


def _protected_series(s: Session) -> set[str]:
    rows = s.scalars(select(Job.series_uid).where(Job.state.in_(PROTECTING_JOB_STATES))).all()
    pending = s.scalars(select(Job.series_uid).join(Delivery, Delivery.job_pk == Job.id)
                        .where(Delivery.state == "pending")).all()
    return set(rows) | set(pending)


def _protected_jobs(s: Session) -> set[int]:
    rows = s.scalars(select(Job.id).where(Job.state.in_(PROTECTING_JOB_STATES))).all()
    pending = s.scalars(select(Delivery.job_pk).where(Delivery.state == "pending")).all()
    return set(rows) | set(pending)


def _file_size(root: Path, rel: str) -> int:
    try:
        return (root / rel).stat().st_size
    except OSError:
        return 0


def candidates(db: Database, root: Path) -> list[Unit]:
    """Every unit retention may delete now, oldest first (no policy applied yet).

    A handful of grouped queries whatever the size of the archive; result file sizes are read from
    the disk (the ``outputs`` table has none).
    """
    units: list[Unit] = []
    with db.session() as s:
        protected = _protected_series(s)
        paths: dict[int, list[str]] = {}
        sizes: dict[int, int] = {}
        for series_pk, path, size in s.execute(select(Instance.series_pk, Instance.path,
                                                      Instance.size_bytes)):
            paths.setdefault(series_pk, []).append(path)
            sizes[series_pk] = sizes.get(series_pk, 0) + int(size or 0)
        for pk, uid, last in s.execute(select(Series.id, Series.series_uid, Series.last_received_at)
                                       .where(Series.state != "receiving")):
            if uid in protected:
                continue
            units.append(Unit("series", uid, aware(last) or utcnow(), tuple(paths.get(pk, ())),
                              sizes.get(pk, 0)))
        protected_jobs = _protected_jobs(s)
        outputs: dict[int, list[str]] = {}
        newest: dict[int, dt.datetime] = {}

        def _newer(job_pk: int, when: dt.datetime | None) -> None:
            when = aware(when)
            if when is not None and (job_pk not in newest or when > newest[job_pk]):
                newest[job_pk] = when

        for job_pk, path, created in s.execute(select(Output.job_pk, Output.path, Output.created_at)):
            if job_pk not in protected_jobs:
                outputs.setdefault(job_pk, []).append(path)
                _newer(job_pk, created)
        if outputs:
            with_outputs = select(Output.job_pk).distinct().scalar_subquery()
            for job_pk, finished in s.execute(select(Job.id, Job.finished_at)
                                              .where(Job.id.in_(with_outputs))):
                if job_pk in outputs:
                    _newer(job_pk, finished)
            for job_pk, delivered in s.execute(select(Delivery.job_pk, func.max(Delivery.delivered_at))
                                               .where(Delivery.job_pk.in_(with_outputs))
                                               .group_by(Delivery.job_pk)):
                if job_pk in outputs:
                    _newer(job_pk, delivered)
        for job_pk, files in outputs.items():
            picture = FileStore.picture_relpath(job_pk)  # the web page's picture, once drawn
            if (root / picture).is_file():
                files.append(picture)
            units.append(Unit("results", str(job_pk), newest.get(job_pk, utcnow()), tuple(files),
                              sum(_file_size(root, p) for p in files)))
    units.sort(key=lambda u: u.age_at)
    return units


def plan(db: Database, config: Config, *, now: dt.datetime | None = None,
         free_bytes: Callable[[], int] | None = None) -> list[Unit]:
    """The units a cleanup would delete now, oldest first, each with its reason.

    Parameters
    ----------
    db:
        The database.
    config:
        ``[retention]`` and ``[storage] root`` are used.
    now:
        The current time (tests).
    free_bytes:
        Free bytes on the storage root (default: :func:`shutil.disk_usage`).

    Returns
    -------
    list of Unit
        What to delete.
    """
    root = config.storage.root_path
    now = now or utcnow()
    ret = config.retention
    cutoff = now - dt.timedelta(days=ret.keep_days) if ret.keep_days > 0 else None
    target = ret.free_disk_target_mb * 1024 * 1024
    free = (free_bytes or (lambda: shutil.disk_usage(root).free))() if target else 0
    chosen: list[Unit] = []
    for unit in candidates(db, root):
        if cutoff is not None and unit.age_at < cutoff:
            reason = "age"
        elif target and free < target:
            reason = "disk"
        else:
            continue
        chosen.append(Unit(unit.kind, unit.key, unit.age_at, unit.files, unit.size_bytes, reason))
        free += unit.size_bytes
    return chosen


def _delete_series_rows(s: Session, unit: Unit) -> bool:
    series = s.scalars(select(Series).where(Series.series_uid == unit.key).with_for_update()).first()
    if series is None:
        return True
    if (series.state == "receiving" or unit.key in _protected_series(s)
            or (aware(series.last_received_at) or unit.age_at) > unit.age_at):
        return False
    study_pk = series.study_pk
    s.execute(delete(Instance).where(Instance.series_pk == series.id))
    s.delete(series)
    s.flush()
    if not s.scalar(select(func.count()).select_from(Series).where(Series.study_pk == study_pk)):
        study = s.get(Study, study_pk)
        if study is not None:
            patient_pk = study.patient_pk
            s.delete(study)
            s.flush()
            if not s.scalar(select(func.count()).select_from(Study).where(Study.patient_pk == patient_pk)):
                patient = s.get(Patient, patient_pk)
                if patient is not None:
                    s.delete(patient)
    return True


def _delete_result_rows(s: Session, unit: Unit) -> bool:
    job_pk = int(unit.key)
    job = s.scalars(select(Job).where(Job.id == job_pk).with_for_update()).first()
    if job is not None and (job.state in PROTECTING_JOB_STATES or job_pk in _protected_jobs(s)):
        return False
    s.execute(delete(Output).where(Output.job_pk == job_pk))
    return True


def _remove_files(root: Path, unit: Unit) -> tuple[int, int]:
    removed = freed = 0
    limit = unit.age_at.timestamp() + MTIME_SLACK_S
    folders: set[Path] = set()
    for rel in unit.files:
        path = root / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime > limit:
            log.warning("retention: %s %s: a file was rewritten after the plan; left in place",
                        unit.kind, unit.key)
            continue
        path.unlink(missing_ok=True)
        removed += 1
        freed += st.st_size
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        for parent in (folder, folder.parent):
            if parent != root and root in parent.parents:
                try:
                    parent.rmdir()  # only when empty
                except OSError:
                    break
    return removed, freed


def cleanup(db: Database, config: Config, *, dry_run: bool = False, now: dt.datetime | None = None,
            free_bytes: Callable[[], int] | None = None) -> CleanupResult:
    """Plan and (unless ``dry_run``) delete; see the module docstring for the rules.

    Parameters
    ----------
    db, config:
        The node's database and configuration.
    dry_run:
        Only plan.
    now, free_bytes:
        As in :func:`plan`.

    Returns
    -------
    CleanupResult
        The planned units and what was actually deleted.
    """
    units = plan(db, config, now=now, free_bytes=free_bytes)
    if dry_run:
        return CleanupResult(tuple(units), 0, 0, (), True)
    root = config.storage.root_path
    files = freed = 0
    skipped: list[str] = []
    done: list[Unit] = []
    for unit in units:
        with db.session() as s:
            ok = _delete_series_rows(s, unit) if unit.kind == "series" else _delete_result_rows(s, unit)
            if ok:
                record_event(s, "cleanup", series_uid=unit.key if unit.kind == "series" else "",
                             job_pk=int(unit.key) if unit.kind == "results" else None,
                             kind=unit.kind, reason=unit.reason, files=len(unit.files),
                             bytes=unit.size_bytes, age_at=unit.age_at.isoformat())
        if not ok:
            skipped.append(f"{unit.kind} {unit.key}: became protected or changed")
            continue
        n, b = _remove_files(root, unit)
        files += n
        freed += b
        done.append(unit)
        metrics.RETENTION_DELETED_BYTES.labels("instances" if unit.kind == "series" else "results").inc(b)
    log.info("retention: deleted %d unit(s), %d file(s), %d MiB; %d skipped", len(done), files,
             freed // (1024 * 1024), len(skipped))
    return CleanupResult(tuple(done), files, freed, tuple(skipped), False)


class RetentionService:
    """Scheduled cleanup inside ``lungnode run`` (APScheduler, one in-memory job, not shared).

    Parameters
    ----------
    config, db:
        The node's configuration and database.
    first_delay_s:
        Seconds after start of the first run.
    """

    name = "retention"

    def __init__(self, config: Config, db: Database, first_delay_s: float = 60.0) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.config = config
        self.db = db
        self.first_delay_s = first_delay_s
        self.scheduler = BackgroundScheduler(timezone=dt.UTC)
        self.runs = 0

    def run_once(self) -> CleanupResult | None:
        """One cleanup; errors are logged and counted, never raised into the scheduler."""
        try:
            result = cleanup(self.db, self.config)
        except Exception:
            log.exception("retention: cleanup failed")
            metrics.RETENTION_RUNS.labels("error").inc()
            return None
        finally:
            self.runs += 1
        metrics.RETENTION_RUNS.labels("ok").inc()
        return result

    def start(self) -> None:
        """Schedule the cleanup every ``[retention] interval_h`` hours."""
        ret = self.config.retention
        if not ret.scheduled or (ret.keep_days == 0 and ret.free_disk_target_mb == 0):
            log.info("retention: scheduled cleanup off")
            return
        first = utcnow() + dt.timedelta(seconds=self.first_delay_s)
        self.scheduler.add_job(self.run_once, "interval", hours=ret.interval_h, id="retention",
                               next_run_time=first, max_instances=1, coalesce=True,
                               replace_existing=True)
        self.scheduler.start()
        log.info("retention: cleanup every %g h (keep %d days, free disk target %d MiB, pid %d)",
                 ret.interval_h, ret.keep_days, ret.free_disk_target_mb, os.getpid())

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the scheduler (a running cleanup finishes its current unit)."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)


def make_service(config: Config, db: Database, store: Any) -> RetentionService:
    """``DEFAULT_SERVICES`` entry of ``lungnode run``: the scheduled cleanup."""
    return RetentionService(config, db)
