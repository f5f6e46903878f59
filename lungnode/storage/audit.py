"""The audit trail: append-only records of who sent what, what ran, and where results went.

Rows carry AE titles, addresses, UIDs, job ids and times, never patient names or IDs. Nothing in
the code updates or deletes an :class:`~lungnode.storage.models.AuditEvent`; retention keeps them,
and :func:`ensure_append_only` makes the database refuse UPDATE and DELETE on the table.
:func:`read_events` is what ``lungnode audit`` prints.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lungnode.storage.db import Database
from lungnode.storage.models import AuditEvent, aware

#: Event names in use.
EVENTS = (
    "association",      # an association ended: calling AE, peer, instances, bytes, outcome
    "rejected",         # an association or instance was refused, with the reason
    "instance_version",  # a SOP instance was re-sent with different bytes: kept as a new version
    "series_complete",  # completion fired: decision and rule
    "job_queued", "job_done", "job_failed", "job_held", "job_released",
    "delivered",        # results acknowledged by a destination
    "delivery_dead",    # retries exhausted
    "delivery_shadow",  # a shadow destination: what would have been sent (nothing was)
    "cleanup",          # retention deleted data
    "web_action",       # an operator's release/retry/resend/reprocess from the web page (who, outcome)
)


def record_event(session: Session, event: str, *, ae_title: str = "", peer: str = "",
                 study_uid: str = "", series_uid: str = "", job_pk: int | None = None,
                 **details: Any) -> None:
    """Append an audit event in the caller's transaction.

    Parameters
    ----------
    session:
        The open session; the event commits with the caller's change.
    event:
        One of :data:`EVENTS`.
    ae_title, peer, study_uid, series_uid, job_pk:
        Who and what.
    **details:
        JSON-serialisable extra facts (no patient data).
    """
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    session.add(AuditEvent(event=event, ae_title=ae_title, peer=peer, study_uid=study_uid,
                           series_uid=series_uid, job_pk=job_pk, details=details))


def read_events(session: Session, *, since: dt.datetime | None = None, event: str | None = None,
                limit: int | None = None) -> list[AuditEvent]:
    """Audit events in the order they were written, optionally filtered.

    Parameters
    ----------
    session:
        An open session.
    since:
        Only events at or after this time.
    event:
        Only events of this name.
    limit:
        At most this many of the newest matching events (still returned oldest first).

    Returns
    -------
    list of AuditEvent
        The rows, oldest first.
    """
    query = select(AuditEvent)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if event:
        query = query.where(AuditEvent.event == event)
    query = query.order_by(AuditEvent.id.desc())
    if limit:
        query = query.limit(limit)
    return list(reversed(session.scalars(query).all()))


def event_dict(row: AuditEvent) -> dict[str, Any]:
    """An audit event as a JSON-serialisable dict (what ``lungnode audit --json`` prints)."""
    at = aware(row.at)
    return {"id": row.id, "at": at.isoformat(), "event": row.event, "ae_title": row.ae_title,
            "peer": row.peer, "study_uid": row.study_uid, "series_uid": row.series_uid,
            "job_pk": row.job_pk, "details": row.details or {}}


_SQLITE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
)
_PG_FUNCTION = (
    "CREATE OR REPLACE FUNCTION lungnode_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit_events is append-only'; END $$"
)
_PG_TRIGGER = (
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_events_append_only') "
    "THEN CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events "
    "FOR EACH STATEMENT EXECUTE FUNCTION lungnode_audit_append_only(); END IF; END $$"
)


def ensure_append_only(db: Database) -> None:
    """Make the database itself refuse UPDATE and DELETE on ``audit_events`` (idempotent).

    SQLite: two ``RAISE(ABORT)`` triggers. PostgreSQL: a statement trigger on UPDATE, DELETE and
    TRUNCATE. ``lungnode run`` calls this at start (metrics service), as do ``lungnode audit`` and
    ``lungnode cleanup``; an administrator can still drop the triggers deliberately.
    """
    with db.engine.begin() as conn:
        if db.is_sqlite:
            for ddl in _SQLITE_TRIGGERS:
                conn.exec_driver_sql(ddl)
        else:
            conn.exec_driver_sql(_PG_FUNCTION)
            conn.exec_driver_sql(_PG_TRIGGER)
