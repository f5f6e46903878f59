"""Notifications: job and delivery events as signed JSON webhooks or HL7 ORU^R01, at least once.

Source of events
    The audit trail. The service reads new ``audit_events`` rows (``job_done`` → ``done``,
    ``job_held`` → ``held``, ``job_failed`` → ``failed``, ``delivered`` → ``delivered``,
    ``delivery_dead`` → ``dead_letter``) and makes one :class:`~lungnode.storage.models.Notification`
    row per subscribed ``[[notifications]]`` receiver, in one transaction with the cursor
    (``notification_cursor``). Rows are unique per (audit event, receiver), and each pass looks back
    :data:`LOOKBACK_IDS` ids behind the cursor, so an event whose id was taken before but committed
    after a later one (PostgreSQL sequences) is not missed. On its very first pass the service starts
    at the end of the trail (no notifications for history): the cursor is set
    :data:`LOOKBACK_IDS` past the last id, so the look-back never reaches back into the history.
Sending
    Due rows are claimed with a lease (a conditional UPDATE, as deliveries are), POSTed with
    ``Content-Type: application/json``, ``X-Lungnode-Event``, ``X-Lungnode-Notification`` (the row
    id: receivers drop duplicates by it) and ``X-Lungnode-Signature: sha256=<hex>``, the
    HMAC-SHA256 of the exact body bytes with the key in ``secret_file``. A 2xx answer marks the row
    ``sent``; anything else waits ``retry_delays_s[attempts-1]`` and is tried again, and after the
    last delay the row is ``dead``. The body is built once, when the row is made, and is the same on
    every attempt. A crash between the receiver's 2xx and the commit sends it again (at least once).
Body
    Event, time, node AE title, job id, state, reason and page link, study/series UIDs, accession
    number, study date, series description, model name and version, measurements and score; for
    delivery events the destination, attempts and error. Patient name and ID only with
    ``include_patient_data = true``.
HL7
    ``kind = "hl7"`` receivers get the same body as an ORU^R01 over MLLP (:mod:`lungnode.ops.hl7`)
    with the control id ``LN<row id>``; an ``AA``/``CA`` acknowledgement counts as sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lungnode.config import Config, NotificationConfig
from lungnode.ops import hl7
from lungnode.ops.http import open_url
from lungnode.ops.polling import PollingService
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.lease import lease_free, take_lease
from lungnode.storage.models import (
    AuditEvent,
    Job,
    Notification,
    NotificationCursor,
    Patient,
    Series,
    Study,
    aware,
    utcnow,
)

log = logging.getLogger(__name__)

#: Audit event → notification event.
EVENT_MAP = {"job_done": "done", "job_held": "held", "job_failed": "failed", "delivered": "delivered",
             "delivery_dead": "dead_letter"}
#: How far behind the cursor each pass looks again (ids committed out of order).
LOOKBACK_IDS = 500
SIGNATURE_HEADER = "X-Lungnode-Signature"
LEASE_S = 120.0


def signature(key: bytes, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of body>``: the value of ``X-Lungnode-Signature``."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def read_secret(path: str) -> bytes:
    """The key in a secret file, without surrounding whitespace (empty path: no key)."""
    return Path(path).read_bytes().strip() if path else b""


def page_url(config: Config, job_pk: int | None) -> str:
    """Link to a job's web page (``[web] public_url`` or the metrics address)."""
    if job_pk is None or not config.web.enabled:
        return ""
    base = config.web.public_url or f"http://{config.metrics.bind}:{config.metrics.port}"
    return f"{base.rstrip('/')}/jobs/{int(job_pk)}"


def build_payload(s: Session, config: Config, event: AuditEvent,
                  receiver: NotificationConfig) -> dict[str, Any]:
    """The JSON body for one audit event and one receiver."""
    job = s.get(Job, event.job_pk) if event.job_pk is not None else None
    found = s.execute(select(Series, Study, Patient).join(Study, Series.study_pk == Study.id)
                      .join(Patient, Study.patient_pk == Patient.id)
                      .where(Series.series_uid == event.series_uid)).first()
    measurements = dict(job.measurements or {}) if job else {}
    model = measurements.get("model") or ({"name": job.model_id, "version": job.model_version}
                                          if job else {})
    details = event.details or {}
    body: dict[str, Any] = {
        "event": EVENT_MAP[event.event],
        "at": (aware(event.at) or utcnow()).isoformat(),
        "node": config.node.ae_title,
        "job": ({"id": job.id, "state": job.state, "reason": job.reason, "attempts": job.attempts,
                 "url": page_url(config, job.id)} if job else None),
        "study_uid": event.study_uid or (job.study_uid if job else ""),
        "series_uid": event.series_uid or (job.series_uid if job else ""),
        "model": model,
        "measurements": {k: measurements[k] for k in ("left", "right", "both",
                                                       "infiltrate_outside_lung_ml", "quality_gate")
                         if k in measurements},
        "score": job.score if job else None,
    }
    if found is not None:
        series, study, patient = found
        body.update(accession_number=study.accession_number, study_date=study.study_date,
                    series_description=series.description)
        if receiver.include_patient_data:
            body["patient"] = {"name": patient.patient_name, "id": patient.patient_id}
    if event.event in ("delivered", "delivery_dead"):
        body["delivery"] = {k: details.get(k) for k in ("destination", "instances", "attempts", "error",
                                                        "mode") if k in details}
    return body


def fan_out(db: Database, config: Config) -> int:
    """Make notification rows for audit events not seen yet; return how many were made."""
    if not config.notifications:
        return 0
    with db.session() as s:
        cursor = s.get(NotificationCursor, 1)
        top = int(s.scalar(select(func.max(AuditEvent.id))) or 0)
        if cursor is None:  # first start: no notifications for the history
            # Each pass reads ids above last_audit_id - LOOKBACK_IDS; starting the cursor that far
            # past the end keeps the look-back off the history (ids <= top) for good.
            s.add(NotificationCursor(id=1, last_audit_id=top + LOOKBACK_IDS))
            return 0
        events = list(s.scalars(select(AuditEvent).where(
            AuditEvent.id > cursor.last_audit_id - LOOKBACK_IDS,
            AuditEvent.event.in_(list(EVENT_MAP))).order_by(AuditEvent.id)))
        if not events:
            cursor.last_audit_id = max(cursor.last_audit_id, top)
            return 0
        have = {(int(a), str(n)) for a, n in s.execute(select(
            Notification.audit_event_id, Notification.notification).where(
            Notification.audit_event_id >= events[0].id))}
        made = 0
        for event in events:
            for receiver in config.notifications:
                if EVENT_MAP[event.event] not in receiver.events or (event.id, receiver.name) in have:
                    continue
                s.add(Notification(notification=receiver.name, event=EVENT_MAP[event.event],
                                   audit_event_id=event.id, job_pk=event.job_pk,
                                   payload=build_payload(s, config, event, receiver),
                                   state="pending", next_attempt_at=utcnow()))
                made += 1
        cursor.last_audit_id = max(cursor.last_audit_id, top)
    return made


def post(receiver: NotificationConfig, body: bytes, headers: dict[str, str]) -> int:
    """POST ``body`` to the receiver; return the HTTP status (raises ``OSError`` without an answer).

    Redirects are not followed (:mod:`lungnode.ops.http`): a 3xx is a failed attempt.
    """
    request = urllib.request.Request(receiver.url, data=body, method="POST", headers=headers)
    try:
        with open_url(request, receiver.timeout_s, receiver.ca) as resp:
            resp.read(65536)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class NotificationSender:
    """Claims due notification rows and sends them (the service's work, also usable directly)."""

    def __init__(self, config: Config, db: Database, owner: str = "") -> None:
        self.config = config
        self.db = db
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:notify"
        self.receivers = {n.name: n for n in config.notifications}

    def claim(self) -> int | None:
        """Lease one due pending row; return its id or ``None``."""
        now = utcnow()
        with self.db.session() as s:
            ids = list(s.scalars(select(Notification.id).where(
                Notification.state == "pending", Notification.next_attempt_at <= now,
                lease_free(Notification, now)).order_by(Notification.next_attempt_at).limit(8)))
        return take_lease(self.db, Notification, ids, self.owner,
                          now + dt.timedelta(seconds=LEASE_S), now)

    def send(self, notification_id: int) -> str:
        """Send one claimed row; return its new state."""
        with self.db.session() as s:
            n = s.get(Notification, notification_id)
            if n is None or n.lease_owner != self.owner:
                return "lost"
            name, event, payload = n.notification, n.event, dict(n.payload or {})
        receiver = self.receivers.get(name)
        status: int | None = None
        if receiver is None:
            error = f"notification {name!r} is no longer configured"
        elif receiver.kind == "hl7":
            try:
                code = hl7.send_mllp(receiver.url, hl7.oru_r01(payload, f"LN{notification_id}"),
                                     receiver.timeout_s)
                error = "" if code in hl7.ACCEPTED else f"HL7 ACK {code}"
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        else:
            body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json", "User-Agent": "lungnode",
                       "X-Lungnode-Event": event, "X-Lungnode-Notification": str(notification_id)}
            try:
                key = read_secret(receiver.secret_file)
                if key:
                    headers[SIGNATURE_HEADER] = signature(key, body)
                status = post(receiver, body, headers)
                error = "" if 200 <= status < 300 else f"HTTP {status}"
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        return self._finish(notification_id, receiver, status, error)

    def _finish(self, notification_id: int, receiver: NotificationConfig | None, status: int | None,
                error: str) -> str:
        now = utcnow()
        with self.db.session() as s:
            n = s.get(Notification, notification_id)
            if n is None or n.lease_owner != self.owner:
                return "lost"
            n.lease_owner, n.lease_expires_at, n.response_status = "", None, status
            if not error:
                n.state, n.sent_at, n.last_error = "sent", now, ""
                return "sent"
            n.attempts += 1
            n.last_error = error
            delays = receiver.retry_delays_s if receiver is not None else ()
            if n.attempts > len(delays):
                n.state = "dead"
                log.error("notification %d (%s, %s) dead after %d attempts: %s", n.id, n.notification,
                          n.event, n.attempts, error)
                return "dead"
            n.next_attempt_at = now + dt.timedelta(seconds=delays[n.attempts - 1])
            log.warning("notification %d to %s failed (attempt %d): %s", n.id, n.notification,
                        n.attempts, error)
            return "pending"

    def run_once(self) -> int:
        """Make rows for new events, then send at most one due row; return rows handled."""
        made = fan_out(self.db, self.config)
        notification_id = self.claim()
        if notification_id is None:
            return made
        self.send(notification_id)
        return made + 1


class NotificationService(PollingService):
    """Background thread of :class:`NotificationSender` (idle when no receiver is configured)."""

    sender: NotificationSender

    def __init__(self, config: Config, db: Database) -> None:
        super().__init__("notifications", NotificationSender(config, db), config.delivery.poll_s,
                         enabled=bool(config.notifications))


def make_service(config: Config, db: Database, store: FileStore) -> NotificationService:
    """Service factory for ``lungnode run``."""
    return NotificationService(config, db)
