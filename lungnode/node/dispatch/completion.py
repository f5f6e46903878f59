"""Series completion: deciding when a series is ready, applying the rules and queuing its job.

This module owns the ``receiving`` → ``complete``/``ignored`` transition of a series.

Timers live in the database
    The ingest transaction sets ``series.completion_due_at = now + quiet_period_s`` with every new
    instance, so the timer is restarted by each instance, survives restarts and is shared by every
    listener process. The :class:`CompletionService` (one per node, in the ``lungnode run`` main
    process) runs an APScheduler ``BackgroundScheduler`` (memory job store, never shared) whose
    interval job (:meth:`CompletionService.tick`, every ``completion.poll_s``) fires due series and
    looks at newly ended associations; a one-shot ``date`` job wakes it exactly at the earliest due
    time when that falls between two polls. At start it rebuilds: series still ``receiving`` without a
    due time get ``last_received_at + quiet_period_s``; associations that ended within the last
    quiet period are looked at again.
Early completion
    When every association that brought instances of a series has been released and the series is
    geometrically complete (:func:`geometry_evidence`: contiguous InstanceNumbers, positions along
    the slice normal regularly spaced without gaps per :mod:`lungnode.inference.geometry`, counts
    agreeing with ImagesInAcquisition / NumberOfFrames), its due time becomes
    ``min(due, released_at + grace_s)``. A gap keeps the full quiet period.
Firing
    The rules see features aggregated from all instances (:mod:`lungnode.node.dispatch.rules`); the decision
    and rule are stored on the series; our own outputs are ``ignored`` with rule ``own-output``
    (loop protection); included series get a job (:func:`lungnode.node.dispatch.jobs.enqueue_series`,
    idempotent). A late instance puts the series back to ``receiving`` (ingest) and the next firing
    queues a job that supersedes the previous result.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from lungnode.config import CompletionConfig, Config
from lungnode.inference.geometry import GeometryError, GeometryPolicy, check_slice_geometry
from lungnode.node.dispatch import jobs
from lungnode.node.dispatch.rules import Decision, decide, load_features
from lungnode.node.ingest.fields import split_numbers
from lungnode.ops.metrics import SERIES_COMPLETED, STAGE_SECONDS
from lungnode.storage.audit import record_event
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import AssociationRecord, Instance, Series, aware, utcnow

log = logging.getLogger(__name__)

OWN_OUTPUT_RULE = "own-output"


# --------------------------------------------------------------------------------------------
# geometric completeness (adapter over lungnode.inference.geometry)
# --------------------------------------------------------------------------------------------

def geometry_evidence(instances: Sequence[Instance], cfg: CompletionConfig) -> tuple[bool, str]:
    """Whether instance rows form a geometrically complete series, with the reason.

    Parameters
    ----------
    instances:
        The series' current instance rows (header fields only).
    cfg:
        ``spacing_tolerance`` is the relative tolerance of regular spacing.

    Returns
    -------
    tuple of (bool, str)
        ``True`` and a summary, or ``False`` and what is missing or irregular.
    """
    if not instances:
        return False, "no instances"
    frames = [max(1, i.number_of_frames or 1) for i in instances]
    if any(f > 1 for f in frames):
        if len(instances) == 1:
            return True, f"one multi-frame object with {frames[0]} frames"
        return False, "several multi-frame objects: no geometric evidence"
    numbers = [i.instance_number for i in instances]
    if any(n is None for n in numbers):
        return False, "InstanceNumber missing"
    present = sorted({int(n) for n in numbers if n is not None})
    if len(present) != len(instances):
        return False, "duplicate InstanceNumbers"
    if present[-1] - present[0] + 1 != len(present):
        return False, (f"InstanceNumbers {present[0]}-{present[-1]} not contiguous "
                       f"({present[-1] - present[0] + 1 - len(present)} missing)")
    expected = {i.images_in_acquisition for i in instances if i.images_in_acquisition}
    if expected and max(expected) != len(instances):
        return False, f"{len(instances)} instances but ImagesInAcquisition = {max(expected)}"
    positions, orientations, sizes = [], [], []
    for i in instances:
        pos, ori = split_numbers(i.image_position), split_numbers(i.image_orientation)
        if pos is None or ori is None or i.rows is None or i.columns is None:
            return False, "position, orientation or size missing"
        positions.append(pos)
        orientations.append(ori)
        sizes.append((int(i.rows), int(i.columns)))
    policy = GeometryPolicy(min_slices=2, spacing_rel_tol=cfg.spacing_tolerance)
    try:
        report = check_slice_geometry(positions, orientations, sizes, instance_numbers=numbers,
                                      policy=policy)
    except GeometryError as exc:
        return False, exc.reason
    return True, f"{report.num_slices} slices, step {report.slice_spacing_mm:.2f} mm, no gap"


# --------------------------------------------------------------------------------------------
# firing and early completion
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fired:
    """What firing one series did."""

    series_uid: str
    decision: str
    rule: str
    job_pk: int | None
    job_created: bool


def fire_series(db: Database, config: Config, model: jobs.ModelIdentity, series_pk: int,
                *, force: bool = False) -> Fired | None:
    """Complete one series if it is still receiving and due (or ``force``).

    Returns
    -------
    Fired or None
        ``None`` when the series was not (or no longer) due.
    """
    with db.session() as s:
        now = utcnow()
        query = select(Series).where(Series.id == series_pk, Series.state == "receiving")
        if not force:
            query = query.where(Series.completion_due_at <= now)
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        series = s.scalar(query)
        if series is None:
            return None
        decision = (Decision("exclude", OWN_OUTPUT_RULE) if series.own_output
                    else decide(config.rules, load_features(s, series)))
        series.state = "complete" if decision.include else "ignored"
        series.decision, series.decision_rule = decision.action, decision.rule[:64]
        series.completed_at = now
        series.completion_due_at = None
        job_pk, created = None, False
        if decision.include:
            result = jobs.enqueue_series(s, series, model)
            job_pk, created = result.job_pk, result.created
        record_event(s, "series_complete", study_uid=series.study.study_uid,
                     series_uid=series.series_uid, job_pk=job_pk, decision=decision.action,
                     rule=decision.rule, job_created=created)
        waited = (now - (aware(series.last_received_at) or now)).total_seconds()
        uid = series.series_uid
    SERIES_COMPLETED.labels("own" if decision.rule == OWN_OUTPUT_RULE else decision.action).inc()
    STAGE_SECONDS.labels("receive_to_complete").observe(max(0.0, waited))
    log.info("series %s complete after %.1f s quiet: %s (rule %s)%s", uid, waited, decision.action,
             decision.rule, f", job {job_pk}{'' if created else ' (existing)'}" if job_pk else "")
    return Fired(uid, decision.action, decision.rule, job_pk, created)


def _released(outcome: str) -> bool:
    return outcome.lower().startswith("releas")


def early_completion(s: Session, cfg: CompletionConfig, series_pk: int) -> dt.datetime | None:
    """Bring a series' due time forward to ``released_at + grace`` when the evidence allows.

    Returns
    -------
    datetime or None
        The new due time, or ``None`` when it stays as it was.
    """
    series = s.get(Series, series_pk)
    if series is None or series.state != "receiving":
        return None
    assoc_ids = set(s.scalars(select(Instance.association_id).where(
        Instance.series_pk == series_pk, Instance.current.is_(True)).distinct()).all())
    if not assoc_ids or "" in assoc_ids:
        return None
    records = s.scalars(select(AssociationRecord).where(AssociationRecord.id.in_(assoc_ids))).all()
    if len(records) != len(assoc_ids) or any(r.ended_at is None for r in records):
        return None  # an association that brought instances is still open
    if not any(_released(r.outcome) for r in records):
        return None
    ended = max(a for a in (aware(r.ended_at) for r in records) if a is not None)
    last = aware(series.last_received_at)
    if last is not None and last > ended:
        return None
    instances = s.scalars(select(Instance).where(Instance.series_pk == series_pk,
                                                 Instance.current.is_(True))).all()
    complete, why = geometry_evidence(instances, cfg)
    if not complete:
        log.debug("series %s keeps its quiet period: %s", series.series_uid, why)
        return None
    due = ended + dt.timedelta(seconds=cfg.grace_s)
    current = aware(series.completion_due_at)
    if current is not None and current <= due:
        return None
    s.execute(update(Series).where(Series.id == series_pk, Series.state == "receiving",
                                   Series.last_received_at == series.last_received_at)
              .values(completion_due_at=due).execution_options(synchronize_session=False))
    log.info("series %s geometrically complete (%s): due %.1f s after release", series.series_uid,
             why, cfg.grace_s)
    return due


# --------------------------------------------------------------------------------------------
# the service
# --------------------------------------------------------------------------------------------

class CompletionService:
    """Fires due series and applies early completion; one per node (``lungnode run`` main process).

    Parameters
    ----------
    config:
        The node configuration.
    db:
        The node database.
    """

    name = "completion"

    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.db = db
        self.model = jobs.model_identity(config)
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._scheduler: BackgroundScheduler | None = None
        self._wake: dt.datetime | None = None
        #: Earliest future due time seen by the last tick (for the one-shot wake-up).
        self.next_due: dt.datetime | None = None

    def rebuild(self) -> int:
        """Give receiving series without a timer one; return how many series are pending."""
        quiet = dt.timedelta(seconds=self.config.completion.quiet_period_s)
        with self.db.session() as s:
            missing = s.scalars(select(Series).where(Series.state == "receiving",
                                                     Series.completion_due_at.is_(None))).all()
            for series in missing:
                series.completion_due_at = (aware(series.last_received_at) or utcnow()) + quiet
            pending = len(s.scalars(select(Series.id).where(Series.state == "receiving")).all())
        log.info("completion: %d series pending at start (%d timers rebuilt), model %s %s",
                 pending, len(missing), self.model.model_id, self.model.version)
        return pending

    def check_released(self) -> tuple[int, list[int]]:
        """Apply early completion for associations that ended recently.

        Returns
        -------
        tuple of (int, list of int)
            Series advanced, and the ids of series now due (read in the same transaction, so a
            tick costs one database transaction when nothing happens).
        """
        now = utcnow()
        lookback = now - dt.timedelta(seconds=self.config.completion.quiet_period_s + 5)
        advanced = 0
        with self.db.session() as s:
            rows = s.execute(select(AssociationRecord.id, AssociationRecord.outcome).where(
                AssociationRecord.ended_at.is_not(None), AssociationRecord.ended_at >= lookback)).all()
            fresh = [(aid, outcome) for aid, outcome in rows if aid not in self._seen]
            for aid, outcome in fresh:
                if not _released(outcome or ""):
                    continue
                series_pks = s.scalars(select(Instance.series_pk).where(
                    Instance.association_id == aid).distinct()).all()
                for pk in series_pks:
                    if early_completion(s, self.config.completion, pk) is not None:
                        advanced += 1
            due = list(s.scalars(select(Series.id).where(Series.state == "receiving",
                                                         Series.completion_due_at <= utcnow())
                                 .order_by(Series.completion_due_at)).all())
            self.next_due = aware(s.scalar(select(func.min(Series.completion_due_at)).where(
                Series.state == "receiving", Series.completion_due_at > utcnow())))
        now_mono = time.monotonic()  # marked seen only once the transaction committed
        self._seen.update((aid, now_mono) for aid, _ in fresh)
        horizon = now_mono - self.config.completion.quiet_period_s - 60
        self._seen = {k: v for k, v in self._seen.items() if v >= horizon}
        return advanced, due

    def fire_due(self, due: list[int] | None = None) -> list[Fired]:
        """Complete every series whose timer has run out (``due``: their ids, if already read)."""
        if due is None:
            with self.db.session() as s:
                due = list(s.scalars(select(Series.id).where(Series.state == "receiving",
                                                             Series.completion_due_at <= utcnow())
                                     .order_by(Series.completion_due_at)).all())
        fired = []
        for pk in due:
            try:
                result = fire_series(self.db, self.config, self.model, pk)
            except Exception:
                log.exception("completion of series pk %d failed; retried on the next tick", pk)
                continue
            if result is not None:
                fired.append(result)
        return fired

    def tick(self) -> None:
        """One pass: newly ended associations (early completion), then due series."""
        with self._lock:
            try:
                _advanced, due = self.check_released()
                self.fire_due(due)
                self._wake_at(self.next_due)
            except Exception:
                log.exception("completion tick failed")

    def _wake_at(self, when: dt.datetime | None) -> None:
        """Schedule a one-shot tick at the earliest due time when it falls between two polls."""
        scheduler = self._scheduler
        if scheduler is None or when is None:
            return
        if (when - utcnow()).total_seconds() > self.config.completion.poll_s * 4:
            return
        if self._wake is not None and abs((self._wake - when).total_seconds()) < 0.005:
            return
        self._wake = when
        scheduler.add_job(self.tick, "date", run_date=when, id="completion-wake",
                          replace_existing=True, misfire_grace_time=30)

    def start(self) -> None:
        """Rebuild from the database and start the scheduler."""
        self.rebuild()
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: max instances" is normal
        scheduler = BackgroundScheduler(timezone=dt.UTC)
        scheduler.add_job(self.tick, "interval", seconds=self.config.completion.poll_s,
                          id="completion-tick", max_instances=1, coalesce=True,
                          next_run_time=dt.datetime.now(dt.UTC))
        scheduler.start()
        self._scheduler = scheduler

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the scheduler, letting a running tick finish."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None


def make_service(config: Config, db: Database, store: FileStore) -> CompletionService:
    """Service factory for ``NodeApp`` (``DEFAULT_SERVICES``)."""
    return CompletionService(config, db)
