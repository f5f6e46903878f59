"""The durable job queue: enqueue, claim with a lease, heartbeat, finish, retry, reprocess, counts.

This module owns every state change of a :class:`~lungnode.storage.models.Job` row.

Key and idempotency
    A job is unique per (SeriesInstanceUID, SHA-256 of the sorted distinct SOP Instance UIDs,
    model id, model version). :func:`enqueue_series` returns the existing row when the key exists,
    so a resent series or a duplicate instance never runs twice. ``lungnode reprocess`` is the one
    deliberate exception: it salts the hash with ``reprocess:N`` so a new row (and a new result that
    supersedes the old one) is made for unchanged content.
States
    ``queued`` → ``running`` (lease: ``lease_owner`` + ``lease_expires_at``, renewed by heartbeats)
    → ``done`` | ``held`` | ``failed`` (with ``reason``). ``superseded``: a newer job of the same
    series replaced it before it finished. A transient failure re-queues the job with
    ``not_before = now + retry_delays_s[attempt-1]`` until ``max_attempts``; a running job whose lease
    expired (its worker crashed or was OOM-killed) is claimed again, counting an attempt.
Claiming
    PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED`` picks a row no other worker is looking at.
    SQLite: the session's ``BEGIN IMMEDIATE`` serialises claimers and the UPDATE is conditional.
Model identity
    Read from the configured bundle's safetensors JSON header without importing torch
    (:func:`model_identity`); ``lungnode-demo``/``0`` when no bundle file exists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from lungnode.config import Config, JobsConfig
from lungnode.node.dispatch.outcome import JobOutcome
from lungnode.storage.audit import record_event
from lungnode.storage.db import Database
from lungnode.storage.models import Instance, Job, Series, aware, utcnow

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "held", "failed", "superseded")
ACTIVE_STATES = ("queued", "running")
RESULT_STATES = ("done", "held")
DEMO_MODEL = ("lungnode-demo", "0")



# --------------------------------------------------------------------------------------------
# model identity
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelIdentity:
    """The model part of a job's key."""

    model_id: str
    version: str


def read_bundle_header(path: Path) -> dict[str, str]:
    """Return the ``__metadata__`` table of a safetensors file's JSON header (no torch import).

    Parameters
    ----------
    path:
        A ``.safetensors`` file.

    Returns
    -------
    dict
        The string-to-string metadata (empty when the header has none).

    Raises
    ------
    ValueError
        The file is not a readable safetensors file.
    """
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise ValueError(f"{path}: safetensors header of {length} bytes is implausible")
        header = json.loads(fh.read(length))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: __metadata__ is not a table")
    return {str(k): str(v) for k, v in meta.items()}


def bundle_path(config: Config) -> Path | None:
    """The model bundle the workers will load: ``inference.model`` or the packaged demo model."""
    if config.inference.model:
        return Path(config.inference.model)
    # the same file as lungnode.inference.engine.default_bundle_path() (not imported: torch)
    demo = Path(__file__).resolve().parents[1] / "models" / "lungnode-demo.safetensors"
    return demo if demo.is_file() else None


def model_identity(config: Config) -> ModelIdentity:
    """Model id and version for job keys, from the bundle's header (cheap, no torch).

    Falls back to ``lungnode-demo``/``0`` when no bundle file exists or its header lacks them.
    """
    path = bundle_path(config)
    if path is None or not path.is_file():
        return ModelIdentity(*DEMO_MODEL)
    try:
        meta = read_bundle_header(path)
        info = json.loads(meta.get("lungnode", "{}"))
        name, version = str(info.get("name", "")), str(info.get("version", ""))
        digest = str(info.get("weights_sha256", ""))[:12]
    except (OSError, ValueError) as exc:
        log.warning("cannot read model bundle header %s: %s", path, exc)
        return ModelIdentity(*DEMO_MODEL)
    if not name:
        return ModelIdentity(*DEMO_MODEL)
    # The weights digest makes a retrained model with an unchanged version string a new key.
    return ModelIdentity(name[:128], (f"{version}+{digest}" if digest else version or "0")[:64])


# --------------------------------------------------------------------------------------------
# enqueue
# --------------------------------------------------------------------------------------------

def instance_set_hash(sop_uids: Iterable[str], salt: str = "") -> str:
    """SHA-256 hex of the sorted distinct SOP Instance UIDs (plus an optional salt line)."""
    text = "\n".join(sorted(set(sop_uids)))
    if salt:
        text += f"\n{salt}"
    return hashlib.sha256(text.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class Enqueued:
    """What :func:`enqueue_series` did."""

    job_pk: int
    created: bool
    supersedes_job_pk: int | None
    superseded: tuple[int, ...]


def enqueue_series(session: Session, series: Series, model: ModelIdentity, *,
                   salt: str = "", reason: str = "") -> Enqueued:
    """Queue a job for the current instances of ``series`` unless its key already exists.

    Older queued/running jobs of the series become ``superseded``; the new job's
    ``supersedes_job_pk`` is the newest ``done``/``held`` job of the series (whose results the new
    ones replace). Runs in the caller's transaction.

    Parameters
    ----------
    session:
        Open session (the caller commits).
    series:
        The series row.
    model:
        Model id and version of the key.
    salt:
        Non-empty only for a deliberate re-run (``reprocess``).
    reason:
        Stored in the job's ``reason`` (e.g. ``reprocess requested``).

    Returns
    -------
    Enqueued
        The job's id and whether it was created.
    """
    rows = session.execute(select(Instance.sop_instance_uid, Instance.received_at).where(
        Instance.series_pk == series.id, Instance.current.is_(True))).all()
    uids = {r[0] for r in rows}
    digest = instance_set_hash(uids, salt)
    existing = session.scalar(select(Job).where(
        Job.series_uid == series.series_uid, Job.instance_set_hash == digest,
        Job.model_id == model.model_id, Job.model_version == model.version))
    if existing is not None:
        return Enqueued(existing.id, False, existing.supersedes_job_pk, ())
    previous = session.scalars(select(Job).where(Job.series_uid == series.series_uid)
                               .order_by(Job.id.desc())).all()
    predecessor = next((j.id for j in previous if j.state in RESULT_STATES), None)
    stamps = [a for a in (aware(r[1]) for r in rows) if a is not None]
    last_at = max(stamps) if stamps else None
    job = Job(series_uid=series.series_uid, study_uid=series.study.study_uid,
              instance_set_hash=digest, instance_count=len(uids), model_id=model.model_id,
              model_version=model.version, state="queued", not_before=utcnow(), reason=reason,
              supersedes_job_pk=predecessor, last_instance_at=last_at)
    session.add(job)
    session.flush()
    superseded = []
    for old in previous:
        if old.state in ACTIVE_STATES:
            old.state = "superseded"
            old.reason = f"superseded by job {job.id}"
            old.lease_owner = ""
            old.finished_at = utcnow()
            superseded.append(old.id)
    record_event(session, "job_queued", study_uid=job.study_uid, series_uid=job.series_uid,
                 job_pk=job.id, instances=len(uids), model=f"{model.model_id} {model.version}",
                 supersedes=predecessor, superseded=superseded)
    return Enqueued(job.id, True, predecessor, tuple(superseded))


# --------------------------------------------------------------------------------------------
# claim / heartbeat / finish
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """A job a worker now holds."""

    job_pk: int
    series_uid: str
    attempt: int
    lease_expires_at: dt.datetime
    #: When the job was queued (queue-wait metric).
    created_at: dt.datetime | None = None


def claim(db: Database, worker_id: str, cfg: JobsConfig) -> Claim | None:
    """Lease the oldest runnable job (queued and due, or running with an expired lease).

    A job whose lease expired after its last allowed attempt is marked ``failed`` instead
    (a job that kills its worker each time must not kill workers forever).

    Parameters
    ----------
    db:
        The database (PostgreSQL: row locks with SKIP LOCKED; SQLite: serialised writers).
    worker_id:
        Stored as ``lease_owner``.
    cfg:
        Lease length and attempt limit.

    Returns
    -------
    Claim or None
        The claimed job, or ``None`` when nothing is runnable.
    """
    for _ in range(8):
        with db.session() as s:
            now = utcnow()
            query = (select(Job).where(or_(
                (Job.state == "queued") & (Job.not_before <= now),
                (Job.state == "running") & (Job.lease_expires_at < now)))
                .order_by(Job.not_before, Job.id).limit(1))
            if not db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            job = s.scalar(query)
            if job is None:
                return None
            if job.state == "running" and job.attempts >= cfg.max_attempts:
                job.state = "failed"
                job.reason = (f"lease of {job.lease_owner} expired on attempt {job.attempts} of "
                              f"{cfg.max_attempts} (worker crashed or was killed)")
                job.lease_owner = ""
                job.finished_at = now
                record_event(s, "job_failed", series_uid=job.series_uid, job_pk=job.id,
                             reason=job.reason)
                continue
            if job.state == "running":
                log.warning("job %d: lease of %s expired; claiming it again", job.id, job.lease_owner)
            expires = now + dt.timedelta(seconds=cfg.lease_s)
            result = s.execute(update(Job).where(Job.id == job.id, Job.state == job.state,
                                                 Job.attempts == job.attempts)
                               .values(state="running", lease_owner=worker_id, lease_expires_at=expires,
                                       attempts=job.attempts + 1, started_at=now)
                               .execution_options(synchronize_session=False))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                continue
            return Claim(job.id, job.series_uid, job.attempts + 1, expires, aware(job.created_at))
    return None


def heartbeat(db: Database, job_pk: int, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; ``False`` when the job is no longer ours (superseded or re-leased)."""
    with db.session() as s:
        result = s.execute(update(Job).where(Job.id == job_pk, Job.lease_owner == worker_id,
                                             Job.state == "running")
                           .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
                           .execution_options(synchronize_session=False))
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def finish(db: Database, job_pk: int, worker_id: str, outcome: JobOutcome) -> bool:
    """Record a normal end (``done`` or ``held``); ``False`` when the job is no longer ours."""
    if outcome.state not in RESULT_STATES:
        raise ValueError(f"a job cannot end in {outcome.state!r}")
    with db.session() as s:
        job = s.get(Job, job_pk)
        if job is None or job.state != "running" or job.lease_owner != worker_id:
            return False
        job.state = outcome.state
        job.reason = outcome.reason
        job.measurements = outcome.measurements or job.measurements
        job.finished_at = utcnow()
        job.lease_owner = ""
        job.lease_expires_at = None
        record_event(s, "job_done" if outcome.state == "done" else "job_held", study_uid=job.study_uid,
                     series_uid=job.series_uid, job_pk=job.id, attempts=job.attempts,
                     reason=outcome.reason)
        return True


def fail(db: Database, job_pk: int, worker_id: str, reason: str, *, transient: bool,
         cfg: JobsConfig) -> str | None:
    """Record a failure: re-queue with backoff when transient and attempts remain, else ``failed``.

    Returns
    -------
    str or None
        The new state, or ``None`` when the job is no longer ours.
    """
    with db.session() as s:
        job = s.get(Job, job_pk)
        if job is None or job.state != "running" or job.lease_owner != worker_id:
            return None
        job.lease_owner = ""
        job.lease_expires_at = None
        job.reason = reason[:4000]
        if transient and job.attempts < cfg.max_attempts:
            delays = cfg.retry_delays_s or (0.0,)
            delay = delays[min(job.attempts, len(delays)) - 1]
            job.state = "queued"
            job.not_before = utcnow() + dt.timedelta(seconds=delay)
        else:
            job.state = "failed"
            job.finished_at = utcnow()
            record_event(s, "job_failed", study_uid=job.study_uid, series_uid=job.series_uid,
                         job_pk=job.id, attempts=job.attempts, reason=job.reason[:500])
        return job.state


# --------------------------------------------------------------------------------------------
# operator commands
# --------------------------------------------------------------------------------------------

def retry_job(db: Database, job_pk: int) -> Job:
    """Queue a ``failed`` job again now with fresh attempts.

    Superseded jobs are not retried (their content is outdated: ``reprocess`` the series instead).

    Raises
    ------
    LookupError
        No such job.
    ValueError
        The job is not in a state that can be retried.
    """
    with db.session() as s:
        job = s.get(Job, job_pk)
        if job is None:
            raise LookupError(f"no job {job_pk}")
        if job.state != "failed":
            raise ValueError(f"job {job_pk} is {job.state}; only failed jobs are retried "
                             "(use `lungnode reprocess` to run a series again)")
        newer = s.scalar(select(Job.id).where(Job.series_uid == job.series_uid, Job.id > job.id,
                                              Job.state != "failed").limit(1))
        if newer is not None:
            raise ValueError(f"job {job_pk} is outdated: job {newer} has newer content of the series "
                             "(use `lungnode reprocess` to run the series again)")
        job.state, job.attempts, job.not_before = "queued", 0, utcnow()
        job.reason = f"retry requested (was: {job.reason[:200]})"
        job.finished_at = None
        s.flush()
        s.expunge(job)
        return job


def reprocess(db: Database, config: Config, series_uid: str) -> Enqueued:
    """Queue a new job for a stored series even if its content was processed already.

    Raises
    ------
    LookupError
        The series is not stored.
    """
    model = model_identity(config)
    with db.session() as s:
        series = s.scalar(select(Series).where(Series.series_uid == series_uid))
        if series is None:
            raise LookupError(f"series {series_uid} is not stored")
        n = s.scalar(select(func.count()).select_from(Job).where(Job.series_uid == series_uid)) or 0
        return enqueue_series(s, series, model, salt=f"reprocess:{n + 1}", reason="reprocess requested")


def counts(db: Database) -> dict[str, int]:
    """Number of jobs per state (every state listed, zero included)."""
    with db.session() as s:
        rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    out = dict.fromkeys(STATES, 0)
    out.update({str(state): int(n) for state, n in rows})
    return out


def list_jobs(db: Database, state: str | None = None, limit: int = 100) -> list[Job]:
    """The newest jobs, optionally of one state."""
    with db.session() as s:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == state)
        jobs = list(s.scalars(query).all())
        for j in jobs:
            s.expunge(j)
        return jobs
