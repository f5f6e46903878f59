"""The audit trail: append-only records of who sent what, what ran, and where results went.

Rows carry AE titles, addresses, UIDs, job ids and times, never patient names or IDs. Nothing in
the code updates or deletes an :class:`~lungnode.storage.models.AuditEvent`; retention keeps them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from lungnode.storage.models import AuditEvent

#: Event names in use.
EVENTS = (
    "association",      # an association ended: calling AE, peer, instances, bytes, outcome
    "rejected",         # an association or instance was refused, with the reason
    "series_complete",  # completion fired: decision and rule
    "job_queued", "job_done", "job_failed", "job_held", "job_released",
    "delivered",        # results acknowledged by a destination
    "delivery_dead",    # retries exhausted
    "cleanup",          # retention deleted data
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
