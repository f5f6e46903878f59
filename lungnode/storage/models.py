"""SQLAlchemy 2 table definitions: the node's durable state.

Tables
------
``patients``, ``studies``, ``series``, ``instances``
    What was received, with the header fields later stages need (selection rules, completion,
    geometry checks) so that no stage re-reads files to decide.
``associations``
    One row per DIMSE association (who sent what, outcome).
``jobs``
    Inference jobs, unique per (series, instance-set hash, model id, model version).
``outputs``
    The DICOM objects a job produced (SEG, SR, SC), with their files.
``deliveries``
    One row per (job, destination): sent exactly once, with retries.
``audit_events``
    Append-only audit trail.
``notifications``, ``notification_cursor``
    Webhook notifications made from audit events, and how far the audit trail has been read.

Patient name and ID are stored (they are needed to answer the PACS) but never logged at INFO.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar, overload

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    """Current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


@overload
def aware(value: dt.datetime) -> dt.datetime: ...
@overload
def aware(value: None) -> None: ...
@overload
def aware(value: dt.datetime | None) -> dt.datetime | None: ...
def aware(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` as timezone-aware UTC (SQLite hands back naive datetimes); ``None`` stays ``None``."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of every lungnode table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


UID = String(64)


class Patient(Base):
    """A patient as identified by the sender (PatientID + IssuerOfPatientID)."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")


class Study(Base):
    """A study (StudyInstanceUID)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")

    patient: Mapped[Patient] = relationship()


class Series(Base):
    """A series, with the series-level features selection rules look at.

    ``state`` is one of ``receiving`` (instances arriving), ``complete`` (completion fired and the
    rules decided), ``ignored`` (complete but excluded, or our own output).
    """

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(String(64), default="")
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    #: True when the series was made by lungnode (loop protection).
    own_output: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    #: Rule name and decision after completion (``include``/``exclude``).
    decision: Mapped[str] = mapped_column(String(16), default="")
    decision_rule: Mapped[str] = mapped_column(String(64), default="")
    #: When completion is due (persisted timer; rebuilt at start).
    completion_due_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                                  nullable=True, index=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    study: Mapped[Study] = relationship()


class Instance(Base):
    """One stored SOP instance (one file), with header fields later stages need.

    A resent instance with identical bytes is not stored twice. One with the same SOP Instance UID
    but different bytes is kept as a new ``version`` (the newest is the one used).
    """

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version"),
        Index("ix_instances_series", "series_pk"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    version: Mapped[int] = mapped_column(Integer, default=1)
    #: True for the newest version of the SOP instance.
    current: Mapped[bool] = mapped_column(Boolean, default=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16), default="")
    image_type: Mapped[str] = mapped_column(String(128), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: ImagePositionPatient as "x\\y\\z" (DICOM DS form), empty when absent.
    image_position: Mapped[str] = mapped_column(String(128), default="")
    image_orientation: Mapped[str] = mapped_column(String(256), default="")
    pixel_spacing: Mapped[str] = mapped_column(String(64), default="")
    slice_thickness: Mapped[float | None] = mapped_column(Float, nullable=True)
    spacing_between_slices: Mapped[float | None] = mapped_column(Float, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    acquisition_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gantry_tilt: Mapped[float | None] = mapped_column(Float, nullable=True)
    kernel: Mapped[str] = mapped_column(String(64), default="")
    #: Path relative to the storage root.
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    association_id: Mapped[str] = mapped_column(String(36), default="", index=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[Series] = relationship()


class AssociationRecord(Base):
    """One DIMSE association handled by the listener."""

    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    peer: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    outcome: Mapped[str] = mapped_column(String(32), default="open")


class Job(Base):
    """An inference job for one series content and one model.

    States: ``queued`` → ``running`` (leased) → ``done`` | ``failed`` | ``held`` (quality gate) |
    ``superseded`` (a newer job for the same series replaced it before it finished).
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("series_uid", "instance_set_hash", "model_id", "model_version"),
        Index("ix_jobs_claim", "state", "not_before"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, index=True)
    study_uid: Mapped[str] = mapped_column(UID)
    instance_set_hash: Mapped[str] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    model_id: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                                 nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    #: Job whose results this one replaces (late instances), for the SR's Predecessor Documents.
    supersedes_job_pk: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    measurements: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When the last instance of the series was received (end-to-end latency).
    last_instance_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                                 nullable=True)

    #: Keys of ``measurements`` that may hold a severity score, in the order they are looked for.
    SCORE_KEYS: ClassVar[tuple[str, ...]] = ("score", "severity_score", "ct_severity_score")

    @property
    def score(self) -> Any:
        """The severity score stored with the measurements (its ``total`` when it is a dict), or
        ``None``: the one reading of it for the pages and the notifications."""
        for key in self.SCORE_KEYS:
            if key in (self.measurements or {}):
                value = (self.measurements or {})[key]
                return value.get("total", value) if isinstance(value, dict) else value
        return None


class LeasedSend:
    """Columns of a row sent to someone under a lease, with retries (deliveries, notifications).

    A sender claims a ``pending`` row whose ``next_attempt_at`` has passed and whose lease is free
    (:func:`lungnode.storage.lease.take_lease`); a failed attempt counts in ``attempts`` and sets
    the next ``next_attempt_at``.
    """

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True),
                                                                 nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")


class Output(Base):
    """A DICOM object a job wrote (SEG, SR or SC instance)."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    #: Destination this object was built for (objects differ per destination settings).
    destination: Mapped[str] = mapped_column(String(64), default="")
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Delivery(LeasedSend, Base):
    """Sending one job's results to one destination, exactly once.

    States: ``pending`` → ``sent`` | ``dead`` (retries exhausted) | ``cancelled`` (the job was
    superseded before this delivery was sent) | ``shadow`` (a ``mode = "shadow"`` destination:
    what it would have received is recorded, nothing is sent).
    """

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_pk", "destination"),)

    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    #: SOP Instance UIDs the peer has acknowledged with a success status.
    acknowledged: Mapped[list[Any]] = mapped_column(JSON, default=list)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEvent(Base):
    """An append-only audit record: who sent what, what ran, where results went. No names."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32))
    ae_title: Mapped[str] = mapped_column(String(16), default="")
    peer: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    job_pk: Mapped[int | None] = mapped_column(Integer, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class HealthProbe(Base):
    """A scratch table the health check writes to (and rolls back) to prove the database is writable."""

    __tablename__ = "health_probe"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Notification(LeasedSend, Base):
    """One event to tell one ``[[notifications]]`` receiver, sent at least once.

    Made from an audit event (``job_done``, ``job_held``, ``job_failed``, ``delivered``,
    ``delivery_dead``) by the notification service; unique per (audit event, receiver).
    States: ``pending`` → ``sent`` | ``dead`` (retries exhausted).
    """

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("audit_event_id", "notification"),
                      Index("ix_notifications_due", "state", "next_attempt_at"))

    #: The receiver's name in ``[[notifications]]``.
    notification: Mapped[str] = mapped_column(String(64))
    #: ``done``, ``held``, ``failed``, ``delivered`` or ``dead_letter``.
    event: Mapped[str] = mapped_column(String(16))
    audit_event_id: Mapped[int] = mapped_column(Integer)
    job_pk: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    #: The JSON body as sent (the same bytes on every attempt).
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: HTTP status of the last answer (None: no answer).
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class NotificationCursor(Base):
    """How far the notification service has read the audit trail (one row, id 1).

    Each pass reads audit ids above ``last_audit_id - LOOKBACK_IDS`` (:mod:`lungnode.ops.notify`);
    the first pass sets it that far past the end of the trail, so history is never notified.
    """

    __tablename__ = "notification_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_audit_id: Mapped[int] = mapped_column(Integer, default=0)
