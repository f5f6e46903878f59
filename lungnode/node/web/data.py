"""What the status pages show, read from the database (no HTML here).

Every function takes an open session and returns plain dicts/lists ready for
:mod:`lungnode.node.web.render`. Patient fields are included only when asked for.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lungnode.storage.models import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    Notification,
    Output,
    Patient,
    Series,
    Study,
    aware,
    utcnow,
)

#: Series listed on the overview.
LAST_SERIES = 100


def percent_of(measurements: dict[str, Any] | None) -> float | None:
    """Percent of both lungs involved, when measured."""
    try:
        return float((measurements or {})["both"]["percent_involved"])
    except (KeyError, TypeError, ValueError):
        return None


def _patient(p: Patient | None, show: bool) -> dict[str, str]:
    if not show or p is None:
        return {}
    return {"patient_name": p.patient_name, "patient_id": p.patient_id, "birth_date": p.birth_date}


def counts(s: Session) -> dict[str, dict[str, int]]:
    """Jobs, deliveries and notifications by state."""
    out: dict[str, dict[str, int]] = {}
    for name, column in (("jobs", Job.state), ("deliveries", Delivery.state),
                         ("notifications", Notification.state)):
        out[name] = {str(k): int(n) for k, n in s.execute(select(column, func.count()).group_by(column))}
    return out


def rates(s: Session, now: dt.datetime | None = None) -> dict[str, int]:
    """Instances received, series completed and jobs finished in the last hour."""
    since = (now or utcnow()) - dt.timedelta(hours=1)
    return {
        "instances_last_hour": int(s.scalar(select(func.count()).select_from(Instance)
                                            .where(Instance.received_at >= since)) or 0),
        "series_completed_last_hour": int(s.scalar(select(func.count()).select_from(Series)
                                                   .where(Series.completed_at >= since)) or 0),
        "jobs_finished_last_hour": int(s.scalar(select(func.count()).select_from(Job)
                                                .where(Job.finished_at >= since)) or 0),
    }


def last_series(s: Session, show_patient_data: bool, limit: int = LAST_SERIES) -> list[dict[str, Any]]:
    """The newest series with their study, instance count, decision and latest job."""
    rows = s.execute(select(Series, Study, Patient).join(Study, Series.study_pk == Study.id)
                     .join(Patient, Study.patient_pk == Patient.id)
                     .order_by(Series.id.desc()).limit(limit)).all()
    ids = [r[0].id for r in rows]
    n_instances = dict(s.execute(select(Instance.series_pk, func.count()).where(
        Instance.series_pk.in_(ids), Instance.current.is_(True)).group_by(Instance.series_pk)).all())
    latest: dict[str, Job] = {}
    for found in s.scalars(select(Job).where(Job.series_uid.in_([r[0].series_uid for r in rows]))
                         .order_by(Job.id)):
        latest[found.series_uid] = found
    out = []
    for series, study, patient in rows:
        job = latest.get(series.series_uid)
        out.append({
            "series_uid": series.series_uid, "received_at": aware(series.last_received_at),
            "study_date": study.study_date, "accession_number": study.accession_number,
            "description": series.description, "modality": series.modality,
            "instances": int(n_instances.get(series.id, 0)), "state": series.state,
            "decision": series.decision, "decision_rule": series.decision_rule,
            "job_pk": job.id if job else None, "job_state": job.state if job else "",
            "percent": percent_of(job.measurements) if job and job.state in ("done", "held") else None,
            "score": job.score if job and job.state in ("done", "held") else None,
            **_patient(patient, show_patient_data)})
    return out


def held_jobs(s: Session) -> list[dict[str, Any]]:
    """Jobs held by the quality gate, with the reason."""
    return [{"job_pk": j.id, "series_uid": j.series_uid, "reason": j.reason,
             "finished_at": aware(j.finished_at)}
            for j in s.scalars(select(Job).where(Job.state == "held").order_by(Job.id.desc()).limit(100))]


def failed_jobs(s: Session) -> list[dict[str, Any]]:
    """Jobs that failed for good."""
    return [{"job_pk": j.id, "series_uid": j.series_uid, "reason": j.reason,
             "finished_at": aware(j.finished_at)}
            for j in s.scalars(select(Job).where(Job.state == "failed").order_by(Job.id.desc()).limit(100))]


def _delivery(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "job_pk": d.job_pk, "destination": d.destination, "state": d.state,
            "attempts": d.attempts, "acknowledged": len(d.acknowledged or []),
            "next_attempt_at": aware(d.next_attempt_at), "delivered_at": aware(d.delivered_at),
            "last_error": d.last_error}


def troubled_deliveries(s: Session) -> list[dict[str, Any]]:
    """Dead-letter deliveries and pending ones that have failed at least once."""
    rows = s.scalars(select(Delivery).where(
        (Delivery.state == "dead") | ((Delivery.state == "pending") & (Delivery.attempts > 0)))
        .order_by(Delivery.id.desc()).limit(100))
    return [_delivery(d) for d in rows]


def shadow_deliveries(s: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Deliveries to shadow destinations, with the objects they would have received."""
    rows = [_delivery(d) for d in s.scalars(select(Delivery).where(Delivery.state == "shadow")
                                            .order_by(Delivery.id.desc()).limit(limit))]
    events = s.scalars(select(AuditEvent).where(
        AuditEvent.event == "delivery_shadow",
        AuditEvent.job_pk.in_([r["job_pk"] for r in rows])).order_by(AuditEvent.id))
    objects = {(e.job_pk, (e.details or {}).get("destination")): len((e.details or {}).get("objects", []))
               for e in events}
    for row in rows:
        row["objects"] = objects.get((row["job_pk"], row["destination"]))
    return rows


def _notification(n: Notification) -> dict[str, Any]:
    return {"id": n.id, "job_pk": n.job_pk, "name": n.notification, "event": n.event,
            "state": n.state, "attempts": n.attempts, "last_error": n.last_error,
            "created_at": aware(n.created_at), "sent_at": aware(n.sent_at),
            "response": n.response_status}


def troubled_notifications(s: Session) -> list[dict[str, Any]]:
    """Dead notifications and pending ones that have failed at least once."""
    rows = s.scalars(select(Notification).where(
        (Notification.state == "dead") | ((Notification.state == "pending")
                                          & (Notification.attempts > 0)))
        .order_by(Notification.id.desc()).limit(100))
    return [_notification(n) for n in rows]


def job_detail(s: Session, job_pk: int, show_patient_data: bool) -> dict[str, Any] | None:
    """Everything the job page shows; ``None`` when there is no such job."""
    job = s.get(Job, job_pk)
    if job is None:
        return None
    found = s.execute(select(Series, Study, Patient).join(Study, Series.study_pk == Study.id)
                      .join(Patient, Study.patient_pk == Patient.id)
                      .where(Series.series_uid == job.series_uid)).first()
    series_info: dict[str, Any] = {}
    if found is not None:
        series, study, patient = found
        series_info = {"description": series.description, "study_date": study.study_date,
                       "accession_number": study.accession_number, "decision": series.decision,
                       "decision_rule": series.decision_rule, **_patient(patient, show_patient_data)}
    events = s.scalars(select(AuditEvent).where(AuditEvent.job_pk == job_pk)
                       .order_by(AuditEvent.id)).all()
    deliveries = {d.destination: d for d in s.scalars(select(Delivery).where(Delivery.job_pk == job_pk))}

    def status(output: Output) -> str:
        d = deliveries.get(output.destination)
        if d is None:
            return "not queued" if output.destination else "kept locally"
        if output.sop_instance_uid in (d.acknowledged or []):
            return "acknowledged"
        return {"sent": "not for this destination", "shadow": "recorded (shadow)"}.get(d.state, d.state)

    return {
        "job": {"id": job.id, "state": job.state, "attempts": job.attempts, "reason": job.reason,
                "series_uid": job.series_uid, "study_uid": job.study_uid,
                "instances": job.instance_count, "model": f"{job.model_id} {job.model_version}",
                "created_at": aware(job.created_at), "started_at": aware(job.started_at),
                "finished_at": aware(job.finished_at), "not_before": aware(job.not_before),
                "supersedes": job.supersedes_job_pk, "lease_owner": job.lease_owner},
        "series": series_info,
        "measurements": job.measurements or {},
        "score": job.score,
        "newer_jobs": list(s.scalars(select(Job.id).where(Job.series_uid == job.series_uid,
                                                          Job.id > job.id))),
        "deliveries": [_delivery(d) for _, d in sorted(deliveries.items())],
        "outputs": [{"kind": o.kind, "destination": o.destination or "(local)",
                     "sop_instance_uid": o.sop_instance_uid, "series_uid": o.series_uid,
                     "transfer_syntax_uid": o.transfer_syntax_uid, "status": status(o)}
                    for o in s.scalars(select(Output).where(Output.job_pk == job_pk).order_by(Output.id))],
        "notifications": [_notification(n) for n in s.scalars(select(Notification).where(
            Notification.job_pk == job_pk).order_by(Notification.id))],
        "audit": [{"at": aware(e.at), "event": e.event, "ae_title": e.ae_title, "peer": e.peer,
                   "details": e.details or {}} for e in events],
    }


def series_jobs(s: Session, series_uid: str) -> list[dict[str, Any]]:
    """Jobs of a series, newest first."""
    return [{"job_pk": j.id, "state": j.state, "attempts": j.attempts, "reason": j.reason,
             "created_at": aware(j.created_at), "percent": percent_of(j.measurements),
             "score": j.score}
            for j in s.scalars(select(Job).where(Job.series_uid == series_uid).order_by(Job.id.desc()))]
