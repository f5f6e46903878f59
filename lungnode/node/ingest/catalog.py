"""The ingest side of storage: turning received, fsync'd files into database rows.

:class:`Catalog` owns every write the listener makes to the database:

* :meth:`Catalog.commit_batch` files a batch of received instances (temp files already written and
  fsync'd) in ONE transaction on the catalog's own connection (Core statements, no ORM session):
  patient/study/series upserts, the instance row (a new version when the SOP Instance UID is
  known with other bytes; nothing when the bytes are identical), the series' completion timer
  (``last_received_at``, ``completion_due_at``, back to ``receiving``), then renames the files
  into place, then commits. A file is renamed before its row commits, so a row never exists
  without its file; a crash between rename and commit leaves a file without a row, which
  :meth:`Catalog.reconcile` indexes at the next start. When one item of a batch fails, the others
  are filed one per transaction.
* association rows (start, end, rejected) and the matching audit events;
* :meth:`Catalog.status_counts` for ``lungnode status``.

Header fields come from :mod:`lungnode.node.ingest.fields` (``header_fields`` is re-exported here),
never from pixel data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.filereader import dcmread
from sqlalchemy import func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from lungnode.node.ingest import catalog_sql
from lungnode.node.ingest.fields import InstanceFields, header_fields
from lungnode.storage.audit import record_event
from lungnode.storage.db import Database
from lungnode.storage.filestore import TMP_DIR, FileStore, fsync_dir
from lungnode.storage.models import (
    AssociationRecord,
    Instance,
    Job,
    Patient,
    Series,
    Study,
    utcnow,
)
from lungnode.uids import is_valid_uid

log = logging.getLogger(__name__)

__all__ = ["CLEAN_SHUTDOWN_MARKER", "RECONCILE_NEEDED_MARKER", "Catalog", "Filed", "Incoming",
           "InstanceFields", "header_fields"]

#: Marker written at a clean shutdown; its absence at start means a crash (reconcile the files).
CLEAN_SHUTDOWN_MARKER = ".clean-shutdown"
#: Marker written when a batch failed after its files were renamed: reconcile at the next start.
RECONCILE_NEEDED_MARKER = ".reconcile-needed"


@dataclass
class Incoming:
    """A received instance whose bytes are in a fsync'd temp file, waiting to be filed."""

    fields: InstanceFields
    temp_path: Path
    sha256: str
    size: int
    transfer_syntax_uid: str
    calling_ae: str = ""
    association_id: str = ""
    received_at: dt.datetime = field(default_factory=utcnow)


class _ItemError(Exception):
    """An item of a batch failed before any file moved; ``cause`` is why."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class Filed:
    """How an instance was filed: ``stored`` (new), ``version`` (same UID, other bytes) or
    ``duplicate`` (identical bytes already stored; nothing written)."""

    outcome: str
    version: int
    relpath: str


class Catalog:
    """Database writes of the ingest path.

    Parameters
    ----------
    db:
        The database.
    store:
        The file store (paths, renames).
    quiet_period_s:
        ``config.completion.quiet_period_s``: ``completion_due_at = now + quiet_period_s``.
    """

    def __init__(self, db: Database, store: FileStore, quiet_period_s: float) -> None:
        self.db = db
        self.store = store
        self.quiet = dt.timedelta(seconds=quiet_period_s)
        self._insert: Any = sqlite.insert if db.is_sqlite else postgresql.insert
        #: series UID → primary key of series this process has written (skips the upserts).
        self._series_pk: dict[str, int] = {}
        #: The ingest batches' connection, opened on first use (see :meth:`commit_batch`), and the
        #: lock that lets one batch at a time use it.
        self._conn: Connection | None = None
        self._batch_lock = threading.Lock()

    # ------------------------------------------------------------------ instances
    def commit_batch(self, batch: Sequence[Incoming]) -> list[Filed | BaseException]:
        """File a batch of received instances in one transaction (see the module docstring).

        The batch is filed in one go on the catalog's own connection (one batch at a time per
        catalog; each listener process has its own). When an item fails before
        any file was moved, the transaction is rolled back and the items are filed one per
        transaction, so one bad item does not fail the others.

        Returns
        -------
        list
            Per item, a :class:`Filed` (durable: safe to acknowledge) or the exception that
            refused it. Temp files of refused and duplicate items are removed.
        """
        results: list[Filed | BaseException]
        with self._batch_lock:
            results = self._commit_all(batch)
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("instance could not be filed: %s", type(result).__name__)
                log.debug("filing error", exc_info=result)
            if isinstance(result, BaseException) or result.outcome == "duplicate":
                item.temp_path.unlink(missing_ok=True)
        return results

    def _commit_all(self, batch: Sequence[Incoming]) -> list[Filed | BaseException]:
        results: list[Filed | BaseException]
        try:
            results = list(self._commit(batch))
        except _ItemError as exc:
            if len(batch) == 1:
                results = [exc.cause]
            else:
                results = []
                for item in batch:
                    try:
                        results.extend(self._commit([item]))
                    except _ItemError as one:
                        results.append(one.cause)
                    except BaseException as one:
                        results.append(one)
        except BaseException as exc:
            results = [exc] * len(batch)
        return results

    def _commit(self, batch: Sequence[Incoming]) -> list[Filed]:
        """File ``batch`` in one transaction: rows, renames, folder fsyncs, commit.

        Raises :class:`_ItemError` when an item fails before any file moved (nothing changed).
        """
        conn = self._connection()
        moves_done = False
        try:
            with conn.begin():
                if not self.db.is_sqlite:
                    for uid in sorted({item.fields.instance["sop_instance_uid"] for item in batch}):
                        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:u))"), {"u": uid})
                filed: list[Filed] = []
                statements = catalog_sql.statements_for(conn)
                for item in batch:
                    try:
                        filed.append(self._file_one(conn, item, statements=statements))
                    except Exception as exc:
                        raise _ItemError(exc) from exc
                folders: set[Path] = set()
                for item, outcome in zip(batch, filed, strict=True):
                    if outcome.outcome == "duplicate":
                        continue
                    moves_done = True
                    final = self.store.path(outcome.relpath)
                    if not final.parent.is_dir():
                        self.store.commit_temp(item.temp_path, outcome.relpath)  # new folders fsync'd
                    else:
                        os.replace(item.temp_path, final)
                        folders.add(final.parent)
                if self.store.fsync:
                    for folder in folders:  # one fsync per folder and batch makes the renames durable
                        fsync_dir(folder)
                # commit happens when the block exits: rows after their files.
            return filed
        except _ItemError:
            self._drop_connection()
            raise
        except BaseException as exc:
            self._drop_connection()
            # Nothing was committed: files already renamed have no rows (indexed at start or
            # overwritten by the sender's retry); the caller removes the temp files.
            log.error("batch of %d instance(s) not committed: %s", len(batch), exc)
            if moves_done:
                try:  # make the next start scan for files without rows even after a clean stop
                    (self.store.root / RECONCILE_NEEDED_MARKER).touch()
                except OSError:
                    log.exception("could not write %s", RECONCILE_NEEDED_MARKER)
            raise

    def _connection(self) -> Connection:
        """The connection the ingest batches use (one writer at a time: the group-commit leader)."""
        if self._conn is None:
            self._conn = self.db.engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close the ingest connection (after the last batch)."""
        with self._batch_lock:
            self._drop_connection()

    def _file_one(self, conn: Connection, item: Incoming, *, existing_path: str = "",
                  statements: catalog_sql.IngestStatements | None = None) -> Filed:
        f = item.fields
        sop_uid = f.instance["sop_instance_uid"]
        sql = statements or catalog_sql.statements_for(conn)
        rows = sql.versions(sop_uid)
        for row in rows:
            if row.sha256 == item.sha256:
                return Filed("duplicate", row.version, row.path)
        version = max((row.version for row in rows), default=0) + 1
        relpath = self.store.instance_relpath(f.study["study_uid"], f.series["series_uid"], sop_uid, version)
        if existing_path and existing_path != relpath:
            raise ValueError(f"file {existing_path} does not match its header (expected {relpath})")
        series_pk = self._upsert_series(conn, sql, f, item.received_at)
        if rows:
            conn.execute(catalog_sql.CLEAR_CURRENT, {"b_sop": sop_uid})
        sql.insert_instance({
            "series_pk": series_pk, "version": version, "current": True, "path": relpath,
            "size_bytes": item.size, "sha256": item.sha256, "transfer_syntax_uid": item.transfer_syntax_uid,
            "calling_ae": item.calling_ae[:16], "association_id": item.association_id[:36],
            "received_at": item.received_at, **f.instance})
        if version > 1:
            log.warning("SOP instance received again with different bytes: stored as version %d "
                        "(association %s)", version, item.association_id)
            with Session(bind=conn) as session:  # joins the connection's transaction
                record_event(session, "instance_version", ae_title=item.calling_ae,
                             study_uid=f.study["study_uid"], series_uid=f.series["series_uid"],
                             sop_instance_uid=sop_uid, version=version,
                             association_id=item.association_id)
                session.flush()
        return Filed("version" if version > 1 else "stored", version, relpath)

    def _upsert_series(self, conn: Connection, sql: catalog_sql.IngestStatements, f: InstanceFields,
                       now: dt.datetime) -> int:
        due = now + self.quiet
        values: dict[str, Any] = {"last_received_at": now, "completion_due_at": due,
                                  "state": "receiving"}
        if f.own_output:
            values["own_output"] = True
        series_uid = f.series["series_uid"]
        cached = self._series_pk.get(series_uid)
        if cached is not None:
            # Known series: one UPDATE (timer, state) instead of the patient/study/series upserts.
            pk = sql.touch_series(cached, values)
            if pk is not None:
                return pk
            self._series_pk.pop(series_uid, None)  # deleted meanwhile (retention)
        ins = self._insert
        conn.execute(ins(Patient).values(**f.patient)
                     .on_conflict_do_nothing(index_elements=["patient_id", "issuer"]))
        patient_pk = conn.execute(select(Patient.id).where(
            Patient.patient_id == f.patient["patient_id"],
            Patient.issuer == f.patient["issuer"])).scalar_one()
        conn.execute(ins(Study).values(patient_pk=patient_pk, **f.study)
                     .on_conflict_do_nothing(index_elements=["study_uid"]))
        study_pk = conn.execute(select(Study.id).where(
            Study.study_uid == f.study["study_uid"])).scalar_one()
        conn.execute(ins(Series).values(study_pk=study_pk, own_output=f.own_output,
                                        state="receiving", first_received_at=now,
                                        last_received_at=now, completion_due_at=due, **f.series)
                     .on_conflict_do_nothing(index_elements=["series_uid"]))
        series_pk = catalog_sql.touch_series(conn, values, series_uid=series_uid)
        assert series_pk is not None  # inserted above if it was missing
        if len(self._series_pk) > 10_000:
            self._series_pk.clear()
        self._series_pk[series_uid] = series_pk
        return series_pk

    # ------------------------------------------------------------------ associations
    def association_started(self, assoc_id: str, *, calling_ae: str, called_ae: str, peer: str) -> None:
        """Insert the association's row (outcome ``open``)."""
        with self.db.session() as session:
            session.add(AssociationRecord(id=assoc_id, calling_ae=calling_ae[:16], called_ae=called_ae[:16],
                                          peer=peer[:64], started_at=utcnow(), outcome="open"))

    def association_ended(self, assoc_id: str, *, outcome: str, instances: int, nbytes: int,
                          failures: int, calling_ae: str, peer: str, seconds: float) -> None:
        """Close the association's row and audit it."""
        with self.db.session() as session:
            session.execute(update(AssociationRecord).where(AssociationRecord.id == assoc_id).values(
                ended_at=utcnow(), outcome=outcome[:32], instances=instances, bytes=nbytes,
                failures=failures))
            record_event(session, "association", ae_title=calling_ae, peer=peer, association_id=assoc_id,
                         instances=instances, bytes=nbytes, failures=failures, outcome=outcome,
                         seconds=round(seconds, 3))

    def association_rejected(self, assoc_id: str, *, calling_ae: str, called_ae: str, peer: str,
                             reason: str) -> None:
        """Record a refused association (row with ``rejected-…`` outcome and an audit event)."""
        now = utcnow()
        with self.db.session() as session:
            session.add(AssociationRecord(id=assoc_id, calling_ae=calling_ae[:16], called_ae=called_ae[:16],
                                          peer=peer[:64], started_at=now, ended_at=now,
                                          outcome=f"rejected-{reason}"[:32]))
            record_event(session, "rejected", ae_title=calling_ae, peer=peer, association_id=assoc_id,
                         what="association", reason=reason, called_ae=called_ae)

    def instance_refused(self, *, assoc_id: str, calling_ae: str, peer: str, status: int, reason: str,
                         sop_instance_uid: str = "") -> None:
        """Audit an instance answered with a failure status."""
        with self.db.session() as session:
            record_event(session, "rejected", ae_title=calling_ae, peer=peer, association_id=assoc_id,
                         what="instance", status=f"0x{status:04X}", reason=reason,
                         sop_instance_uid=sop_instance_uid if is_valid_uid(sop_instance_uid) else "")

    def close_open_associations(self, outcome: str = "interrupted") -> int:
        """Close rows still ``open`` (left by a crash, or at shutdown); return how many."""
        with self.db.session() as session:
            result = session.execute(update(AssociationRecord)
                                     .where(AssociationRecord.ended_at.is_(None))
                                     .values(ended_at=utcnow(), outcome=outcome))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ status
    def status_counts(self) -> dict[str, Any]:
        """Counts for ``lungnode status``: studies, series by state, instances, jobs by state, disk."""
        with self.db.session() as session:
            studies = session.execute(select(func.count()).select_from(Study)).scalar_one()
            series = dict(session.execute(select(Series.state, func.count()).group_by(Series.state)).all())
            instances = session.execute(select(func.count()).select_from(Instance)
                                        .where(Instance.current.is_(True))).scalar_one()
            versions = session.execute(select(func.count()).select_from(Instance)).scalar_one()
            nbytes = session.execute(select(func.coalesce(func.sum(Instance.size_bytes), 0))).scalar_one()
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            open_assocs = session.execute(select(func.count()).select_from(AssociationRecord)
                                          .where(AssociationRecord.ended_at.is_(None))).scalar_one()
        return {"studies": int(studies),
                "series": {str(k): int(v) for k, v in series.items()},
                "series_total": int(sum(series.values())),
                "instances": int(instances),
                "instance_files": int(versions),
                "stored_bytes": int(nbytes),
                "jobs": {str(k): int(v) for k, v in jobs.items()},
                "open_associations": int(open_assocs),
                "disk_free_bytes": int(self.store.free_bytes()),
                "storage_root": str(self.store.root)}

    # ------------------------------------------------------------------ recovery
    def reconcile(self, *, force: bool = False) -> dict[str, int]:
        """Index files that are on disk without a row (a crash between rename and commit).

        Policy: such a file is complete (fsync'd before its rename) and passed the checks before it
        was renamed, but its success was never sent. It is indexed from its header (the sender's
        retry then finds identical bytes and gets success without a second copy); a file whose
        header cannot be read or does not match its path is deleted. The scan is skipped after a
        clean shutdown (marker file) unless a failed commit asked for it, so it costs time only after
        a crash or a database failure.

        Returns
        -------
        dict
            ``indexed``, ``deleted`` and ``scanned`` file counts (``skipped`` = 1 when not needed).
        """
        marker = self.store.root / CLEAN_SHUTDOWN_MARKER
        needed = self.store.root / RECONCILE_NEEDED_MARKER
        counts = {"indexed": 0, "deleted": 0, "scanned": 0, "skipped": 0}
        if marker.exists() and not needed.exists() and not force:
            marker.unlink()
            counts["skipped"] = 1
            return counts
        marker.unlink(missing_ok=True)
        needed.unlink(missing_ok=True)
        for study_dir in sorted(self.store.root.iterdir()):
            if not study_dir.is_dir() or study_dir.name in (TMP_DIR, "results") \
                    or not is_valid_uid(study_dir.name):
                continue
            for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
                prefix = f"{study_dir.name}/{series_dir.name}/"
                files = sorted(series_dir.glob("*.dcm"))
                if not files:
                    continue
                with self.db.session() as session:
                    known = set(session.execute(select(Instance.path)
                                                .where(Instance.path.like(prefix + "%"))).scalars())
                for file in files:
                    counts["scanned"] += 1
                    relpath = prefix + file.name
                    if relpath not in known:
                        counts["indexed" if self._index_orphan(file, relpath) else "deleted"] += 1
        if counts["indexed"] or counts["deleted"]:
            log.warning("reconciled files without rows: %d indexed, %d deleted",
                        counts["indexed"], counts["deleted"])
        return counts

    def _index_orphan(self, file: Path, relpath: str) -> bool:
        import hashlib

        try:
            data = file.read_bytes()
            ds = dcmread(file, stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
            fields = header_fields(ds)
            item = Incoming(fields=fields, temp_path=file, sha256=hashlib.sha256(data).hexdigest(),
                            size=len(data), transfer_syntax_uid=ts, association_id="recovered",
                            received_at=dt.datetime.fromtimestamp(file.stat().st_mtime, dt.UTC))
            with self.db.engine.connect() as conn, conn.begin():
                filed = self._file_one(conn, item, existing_path=relpath)
            if filed.outcome == "duplicate":
                raise ValueError("identical bytes already stored under another path")
            return True
        except Exception as exc:
            log.warning("deleting unindexable file %s: %s", relpath, exc)
            file.unlink(missing_ok=True)
            return False

    def mark_clean_shutdown(self) -> None:
        """Write the clean-shutdown marker (call after the listener and the writer have stopped)."""
        marker = self.store.root / CLEAN_SHUTDOWN_MARKER
        marker.write_text(utcnow().isoformat())
        if self.store.fsync:
            fd = os.open(marker, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
