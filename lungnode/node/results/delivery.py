"""Sending results to PACS: the delivery service, exactly once per destination.

Destinations are DICOM peers (``kind = "dimse"``, C-STORE below) or DICOMweb services
(``kind = "stow-rs"``, :mod:`lungnode.node.results.stowrs`); both go through the same claim,
acknowledgement, retry and dead-letter steps. A destination with ``mode = "shadow"`` sends nothing:
its delivery is marked ``shadow`` and the audit event ``delivery_shadow`` lists every object it would
have received.

Model
    A job's outputs are built once per destination and stored as files with
    :class:`~lungnode.storage.models.Output` rows; sending only reads those files, so a retry never
    makes new SOP Instance UIDs. One :class:`~lungnode.storage.models.Delivery` row per (job,
    destination) tracks the send: ``pending`` → ``sent`` | ``dead`` (retries exhausted) |
    ``cancelled`` (a newer job replaced the result before any instance was sent) | ``shadow``
    (a shadow destination: recorded, not sent).
Claim
    The service claims one due delivery (``pending``, ``next_attempt_at`` passed, job ``done``,
    no live lease) with a conditional UPDATE that sets ``lease_owner``/``lease_expires_at``; only
    one process can win it. The lease is renewed with every acknowledged instance.
Acknowledgements
    Every instance's C-STORE status is checked. Success (0x0000) and the storage warnings
    (0xB000, 0xB006, 0xB007: stored with coercion) count as stored; the SOP Instance UID is then
    committed to ``Delivery.acknowledged`` before the next one is sent. After a crash only
    unacknowledged instances are sent again (one that was stored but whose acknowledgement was not
    yet committed is re-sent with the same UID, which a PACS stores idempotently).
Association
    One association per delivery attempt (:func:`lungnode.node.dimse.scu.send_items`), proposing
    exactly the (SOP class, transfer syntax) pairs of the files; pynetdicom sends the stored bytes
    without re-encoding.
Retries
    A failed attempt waits ``[delivery] retry_delays_s[attempts-1]``; after the last delay the
    delivery is dead-lettered (audit ``delivery_dead``); ``lungnode resend JOB`` starts it again.

:meth:`DeliverySender.record_ack` commits one acknowledgement; the restart tests crash a sender
right before it (``tests/launch.py`` subclasses the sender; nothing of that is in this module).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Callable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from lungnode.config import Config, DeliveryConfig, DestinationConfig
from lungnode.node.dimse.scu import LeaseLostError, OutboundItem, SendResult, send_items
from lungnode.node.results import stowrs
from lungnode.ops import metrics
from lungnode.ops.polling import PollingService
from lungnode.storage.audit import record_event
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.lease import lease_free, take_lease
from lungnode.storage.models import Delivery, Job, Output, aware, utcnow

log = logging.getLogger(__name__)


def send_to(dest: DestinationConfig, items: Sequence[OutboundItem], *, timeout: float = 60.0,
            on_ack: Callable[[str], None] | None = None) -> SendResult:
    """Send ``items`` to ``dest`` by its kind: C-STORE (:func:`send_items`) or STOW-RS."""
    if dest.kind != "stow-rs":
        return send_items(dest, items, timeout=timeout, on_ack=on_ack)
    stow = stowrs.stow_items(dest, items, timeout=timeout, on_ack=on_ack)
    return SendResult(acknowledged=stow.acknowledged, failures=stow.failures, error=stow.error)


# ----------------------------------------------------------------------------------------------
# Delivery rows
# ----------------------------------------------------------------------------------------------

def queue_deliveries(session: Session, job_pk: int, destinations: Sequence[str]) -> list[str]:
    """Create ``pending`` deliveries of a job for each destination that has none yet.

    Runs in the caller's transaction; returns the destinations queued now.
    """
    have = set(session.scalars(select(Delivery.destination).where(Delivery.job_pk == job_pk)))
    queued = []
    for name in destinations:
        if name and name not in have:
            session.add(Delivery(job_pk=job_pk, destination=name, state="pending",
                                 next_attempt_at=utcnow(), acknowledged=[]))
            queued.append(name)
    return queued


def outbound_items(session: Session, store: FileStore, job_pk: int, dest: DestinationConfig,
                   skip: Sequence[str] = ()) -> list[OutboundItem]:
    """The stored outputs of a job built for ``dest`` that it should receive, minus ``skip``."""
    rows = session.scalars(select(Output).where(Output.job_pk == job_pk,
                                                Output.destination == dest.name)
                           .order_by(Output.id)).all()
    order = {"seg": 0, "sr": 1, "sc": 2, "summary": 3, "pdf": 4}
    skipped = set(skip)
    return [OutboundItem(r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid,
                         store.path(r.path))
            for r in sorted(rows, key=lambda r: (order.get(r.kind, 9), r.id))
            if r.kind in dest.objects and r.sop_instance_uid not in skipped]


def resend(db: Database, config: Config, job_pk: int, destination: str | None = None) -> list[str]:
    """Queue a job's stored outputs again (same SOP Instance UIDs) for one or all destinations.

    Existing deliveries restart from scratch (attempts and acknowledgements cleared); missing ones
    are created for destinations the outputs were built for.

    Returns
    -------
    list of str
        The destinations queued.
    """
    names = [destination] if destination else [d.name for d in config.destinations]
    queued = []
    with db.session() as s:
        job = s.get(Job, job_pk)
        if job is None:
            raise KeyError(f"no job {job_pk}")
        if job.state != "done":
            raise ValueError(f"job {job_pk} is {job.state}; only done jobs are sent "
                             "(held ones: lungnode release)")
        built = set(s.scalars(select(Output.destination).where(Output.job_pk == job_pk)))
        for name in names:
            config.destination(name)  # KeyError for an unknown destination
            if name not in built:
                continue
            d = s.scalar(select(Delivery).where(Delivery.job_pk == job_pk,
                                                Delivery.destination == name))
            if d is None:
                s.add(Delivery(job_pk=job_pk, destination=name, state="pending",
                               next_attempt_at=utcnow(), acknowledged=[]))
            else:
                d.state, d.attempts, d.acknowledged = "pending", 0, []
                d.next_attempt_at, d.last_error = utcnow(), ""
                d.lease_owner, d.lease_expires_at, d.delivered_at = "", None, None
            queued.append(name)
    return queued


def release(db: Database, config: Config, job_pk: int) -> list[str]:
    """Release a job held by the quality gate: mark it ``done`` and queue its deliveries."""
    with db.session() as s:
        job = s.get(Job, job_pk)
        if job is None:
            raise KeyError(f"no job {job_pk}")
        if job.state != "held":
            raise ValueError(f"job {job_pk} is {job.state}, not held")
        built = set(s.scalars(select(Output.destination).where(Output.job_pk == job_pk)))
        held_reason = job.reason
        job.state = "done"
        job.reason = f"released by operator (held: {held_reason})"[:2000]
        queued = queue_deliveries(s, job_pk, [d.name for d in config.destinations
                                              if d.name in built])
        record_event(s, "job_released", study_uid=job.study_uid, series_uid=job.series_uid,
                     job_pk=job_pk, held_reason=held_reason, destinations=queued)
    return queued



class DeliverySender:
    """Claims due deliveries and sends them (used by the service and ``resend --now``).

    Parameters
    ----------
    config, db, store:
        The node's configuration, database and file store.
    owner:
        Lease owner name (host:pid:thread by default).
    """

    def __init__(self, config: Config, db: Database, store: FileStore, owner: str = "") -> None:
        self.config = config
        self.db = db
        self.store = store
        self.cfg: DeliveryConfig = config.delivery
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:delivery"

    def claim(self, delivery_id: int | None = None) -> int | None:
        """Claim one due delivery (or the given one, if pending); return its id or ``None``."""
        now = utcnow()
        with self.db.session() as s:
            query = (select(Delivery.id).join(Job, Job.id == Delivery.job_pk)
                     .where(Delivery.state == "pending", Job.state == "done",
                            lease_free(Delivery, now)))
            if delivery_id is None:
                query = query.where(Delivery.next_attempt_at <= now)
            else:
                query = query.where(Delivery.id == delivery_id)
            candidates = list(s.scalars(query.order_by(Delivery.next_attempt_at).limit(8)))
        return take_lease(self.db, Delivery, candidates, self.owner,
                          now + dt.timedelta(seconds=self.cfg.lease_s), now)

    def record_ack(self, delivery_id: int, sop_uid: str) -> None:
        """Commit that the peer stored ``sop_uid`` and renew the lease, before the next is sent.

        Raises :class:`LeaseLostError` when another sender owns the delivery now.
        """
        with self.db.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None or d.lease_owner != self.owner:
                raise LeaseLostError(f"delivery {delivery_id} is no longer ours")
            d.acknowledged = [*list(d.acknowledged or []), sop_uid]
            d.lease_expires_at = utcnow() + dt.timedelta(seconds=self.cfg.lease_s)

    def send(self, delivery_id: int) -> str:
        """Send a claimed delivery; return its new state (``sent``, ``pending``, ``dead``)."""
        with self.db.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None or d.lease_owner != self.owner:
                return "lost"
            job = s.get(Job, d.job_pk)
            try:
                dest = self.config.destination(d.destination)
            except KeyError:
                dest = None
            items = ([] if dest is None or job is None else
                     outbound_items(s, self.store, d.job_pk, dest, d.acknowledged or []))
            last_instance_at = aware(job.last_instance_at) if job else None
            job_pk = d.job_pk
        started = utcnow()
        if dest is not None and dest.mode == "shadow":
            return self._shadow(delivery_id, job_pk, dest, items)
        if dest is None:
            result = SendResult(error=f"destination {d.destination!r} is no longer configured")
        else:
            missing = [i for i in items if not i.path.is_file()]
            if missing:
                result = SendResult(error=f"{len(missing)} output file(s) missing, e.g. "
                                          f"{missing[0].path.name}")
            else:
                try:
                    result = send_to(dest, items, timeout=self.cfg.timeout_s,
                                     on_ack=lambda uid: self.record_ack(delivery_id, uid))
                except LeaseLostError as exc:
                    log.warning("%s", exc)
                    return "lost"
        return self._finish(delivery_id, job_pk, result, started, last_instance_at)

    def _shadow(self, delivery_id: int, job_pk: int, dest: DestinationConfig,
                items: Sequence[OutboundItem]) -> str:
        """Record what a shadow destination would have received; send nothing."""
        objects = [{"sop_class_uid": i.sop_class_uid, "sop_instance_uid": i.sop_instance_uid,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "bytes": i.path.stat().st_size if i.path.is_file() else None} for i in items]
        with self.db.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None or d.lease_owner != self.owner:
                return "lost"
            job = s.get(Job, job_pk)
            d.state, d.lease_owner, d.lease_expires_at = "shadow", "", None
            d.delivered_at, d.last_error = utcnow(), ""
            record_event(s, "delivery_shadow", ae_title=dest.ae_title,
                         study_uid=job.study_uid if job else "",
                         series_uid=job.series_uid if job else "", job_pk=job_pk,
                         destination=dest.name, kind=dest.kind, target=dest.target, objects=objects)
        metrics.DELIVERIES.labels("shadow").inc()
        log.info("job %d: shadow destination %s: %d object(s) recorded, not sent", job_pk, dest.name,
                 len(objects))
        return "shadow"

    def _finish(self, delivery_id: int, job_pk: int, result: SendResult, started: dt.datetime,
                last_instance_at: dt.datetime | None) -> str:
        now = utcnow()
        with self.db.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None or d.lease_owner != self.owner:
                return "lost"
            job = s.get(Job, job_pk)
            d.lease_owner = ""
            d.lease_expires_at = None
            if result.ok:
                d.state = "sent"
                d.delivered_at = now
                d.last_error = ""
                dest = self.config.destination(d.destination)
                record_event(s, "delivered", ae_title=dest.ae_title,
                             study_uid=job.study_uid if job else "",
                             series_uid=job.series_uid if job else "", job_pk=job_pk,
                             destination=d.destination, kind=dest.kind, target=dest.target,
                             instances=len(d.acknowledged or []))
                metrics.DELIVERIES.labels("sent").inc()
                metrics.STAGE_SECONDS.labels("send").observe((now - started).total_seconds())
                if last_instance_at is not None:
                    metrics.END_TO_END_SECONDS.observe((now - last_instance_at).total_seconds())
                log.info("job %d delivered to %s (%d instances)", job_pk, d.destination,
                         len(d.acknowledged or []))
                return "sent"
            d.attempts += 1
            errors = [result.error] if result.error else []
            errors += [f"{uid}: {why}" for uid, why in list(result.failures.items())[:3]]
            d.last_error = "; ".join(errors)[:2000]
            if d.attempts > len(self.cfg.retry_delays_s):
                d.state = "dead"
                record_event(s, "delivery_dead", study_uid=job.study_uid if job else "",
                             series_uid=job.series_uid if job else "", job_pk=job_pk,
                             destination=d.destination, attempts=d.attempts, error=d.last_error)
                metrics.DELIVERIES.labels("dead").inc()
                log.error("job %d to %s dead-lettered after %d attempts: %s", job_pk,
                          d.destination, d.attempts, d.last_error)
                return "dead"
            delay = self.cfg.retry_delays_s[d.attempts - 1]
            d.next_attempt_at = now + dt.timedelta(seconds=delay)
            metrics.DELIVERIES.labels("retry").inc()
            log.warning("job %d to %s failed (attempt %d), retry in %.0f s: %s", job_pk,
                        d.destination, d.attempts, delay, d.last_error)
            return "pending"

    def run_once(self) -> int:
        """Claim and send at most one due delivery; return how many were handled (0 or 1)."""
        delivery_id = self.claim()
        if delivery_id is None:
            return 0
        self.send(delivery_id)
        return 1


class DeliveryService(PollingService):
    """Background thread sending due deliveries (a :class:`lungnode.node.service.Service`)."""

    sender: DeliverySender

    def __init__(self, config: Config, db: Database, store: FileStore,
                 sender: DeliverySender | None = None) -> None:
        super().__init__("delivery", sender or DeliverySender(config, db, store),
                         config.delivery.poll_s)


def make_service(config: Config, db: Database, store: FileStore) -> DeliveryService:
    """Service factory for :class:`~lungnode.node.app.NodeApp`."""
    return DeliveryService(config, db, store)
