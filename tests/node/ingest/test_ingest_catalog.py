"""The ingest storage API (:class:`lungnode.node.ingest.catalog.Catalog`) on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from lungnode.node.ingest import catalog_sql
from lungnode.node.ingest.catalog import CLEAN_SHUTDOWN_MARKER, Catalog, Filed, Incoming, header_fields
from lungnode.storage.audit import read_events
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Instance, Series
from lungnode.uids import InvalidUIDError


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    url = (f"sqlite:///{tmp_path / 'db.sqlite3'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_db_url"))
    db = Database(url)
    store = FileStore(tmp_path / "store", fsync=False)
    yield Catalog(db, store, quiet_period_s=30.0)
    db.dispose()


def _incoming(catalog: Catalog, path: Path, edit: dict[str, str] | None = None) -> Incoming:
    ds = pydicom.dcmread(path)
    for key, value in (edit or {}).items():
        setattr(ds, key, value)
    tmp = catalog.store.temp_file()
    ds.save_as(tmp, enforce_file_format=True)
    data = tmp.read_bytes()
    return Incoming(fields=header_fields(pydicom.dcmread(tmp, stop_before_pixels=True)), temp_path=tmp,
                    sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="PACS",
                    association_id="a1")


def test_batch_duplicate_and_version(catalog: Catalog, chest_ct_dir: Path) -> None:
    files = sorted(chest_ct_dir.glob("*.dcm"))[:3]
    batch = [_incoming(catalog, f) for f in files]
    again = _incoming(catalog, files[0])  # identical bytes in the same batch
    changed = _incoming(catalog, files[1], {"SeriesDescription": "edited"})
    results = catalog.commit_batch([*batch, again, changed])
    assert [r.outcome for r in results if isinstance(r, Filed)] == \
        ["stored", "stored", "stored", "duplicate", "version"]
    assert not any(p.exists() for p in (again.temp_path,))
    with catalog.db.session() as session:
        rows = list(session.execute(select(Instance).order_by(Instance.id)).scalars())
        series = session.execute(select(Series)).scalar_one()
        assert len(rows) == 4 and [r.version for r in rows] == [1, 1, 1, 2]
        assert [r.current for r in rows] == [True, False, True, True]
        assert series.state == "receiving" and series.modality == "CT"
        assert series.completion_due_at is not None
        assert (series.completion_due_at - series.last_received_at).total_seconds() == 30.0
    for row in rows:
        assert (catalog.store.root / row.path).is_file()
    assert list(catalog.store.tmp.iterdir()) == []
    counts = catalog.status_counts()
    assert counts["instances"] == 3 and counts["instance_files"] == 4 and counts["studies"] == 1
    assert counts["series"] == {"receiving": 1}
    with catalog.db.session() as session:
        (event,) = read_events(session, event="instance_version")
        assert event.details["version"] == 2


def test_one_bad_item_does_not_fail_its_batch(catalog: Catalog, chest_ct_dir: Path) -> None:
    files = sorted(chest_ct_dir.glob("*.dcm"))[:3]
    batch = [_incoming(catalog, f) for f in files]
    batch[1].fields.series["series_uid"] = "1.2..3"  # not a UID: refused before it becomes a path
    results = catalog.commit_batch(batch)
    assert isinstance(results[1], InvalidUIDError)
    assert [r.outcome for r in results if isinstance(r, Filed)] == ["stored", "stored"]
    assert list(catalog.store.tmp.iterdir()) == []  # the refused item's temp file is gone
    with catalog.db.session() as session:
        assert len(list(session.execute(select(Instance)).scalars())) == 2


def test_sqlite_cursor_statements_write_the_rows_sqlalchemy_writes(
        tmp_path: Path, chest_ct_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SQLite hot path (DB-API cursor) and SQLAlchemy Core store identical rows."""
    files = sorted(chest_ct_dir.glob("*.dcm"))[:3]
    tables: dict[str, dict[str, list[tuple[object, ...]]]] = {}
    for mode in ("cursor", "core"):
        if mode == "core":
            monkeypatch.setattr(catalog_sql, "statements_for", catalog_sql.CoreStatements)
        db = Database(f"sqlite:///{tmp_path / mode}.sqlite3")
        catalog = Catalog(db, FileStore(tmp_path / mode, fsync=False), quiet_period_s=30.0)
        batch = [_incoming(catalog, f) for f in files]
        batch.append(_incoming(catalog, files[0], {"SeriesDescription": "edited"}))
        for item in batch:
            item.received_at = dt.datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=dt.UTC)
        assert all(isinstance(r, Filed) for r in catalog.commit_batch(batch[:2]))
        assert all(isinstance(r, Filed) for r in catalog.commit_batch(batch[2:]))  # known series
        catalog.close()
        with db.engine.connect() as conn:
            tables[mode] = {name: [tuple(row) for row in conn.exec_driver_sql(
                f"SELECT * FROM {name} ORDER BY id")] for name in ("instances", "series")}
        db.dispose()
    assert tables["cursor"] == tables["core"]
    assert len(tables["cursor"]["instances"]) == 4


def test_concurrent_versions_do_not_collide(catalog: Catalog, chest_ct_dir: Path) -> None:
    """Two writers (as in two listener processes, each with its own catalog) and two threads on
    one catalog file versions of the same SOP instance at the same time."""
    src = sorted(chest_ct_dir.glob("*.dcm"))[0]
    items = [_incoming(catalog, src, {"SeriesDescription": f"variant {i}"}) for i in range(9)]
    results: list[Filed | BaseException] = []
    lock = threading.Lock()
    other = Catalog(catalog.db, catalog.store, quiet_period_s=30.0)

    def run(writer: Catalog, chunk: list[Incoming]) -> None:
        out = writer.commit_batch(chunk)
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=run, args=(writer, items[i::3]))
               for i, writer in enumerate((catalog, other, catalog))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, Filed) for r in results), results
    assert sorted(r.version for r in results if isinstance(r, Filed)) == list(range(1, 10))
    other.close()
    with catalog.db.session() as session:
        current = list(session.execute(select(Instance).where(Instance.current.is_(True))).scalars())
        assert len(current) == 1 and current[0].version == 9


def test_reconcile_indexes_orphans_and_deletes_garbage(catalog: Catalog, chest_ct_dir: Path) -> None:
    src = sorted(chest_ct_dir.glob("*.dcm"))[4]
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    # A crash between rename and commit: the file is in place, its row is not.
    orphan = catalog.store.path(catalog.store.instance_relpath(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    orphan.parent.mkdir(parents=True)
    shutil.copyfile(src, orphan)
    garbage = orphan.parent / f"{generate_uid()}.dcm"
    garbage.write_bytes(b"not dicom")
    catalog.mark_clean_shutdown()
    assert catalog.reconcile()["skipped"] == 1  # after a clean shutdown no scan
    assert not (catalog.store.root / CLEAN_SHUTDOWN_MARKER).exists()
    counts = catalog.reconcile()  # no marker: as after a crash
    assert counts["indexed"] == 1 and counts["deleted"] == 1
    assert orphan.exists() and not garbage.exists()
    with catalog.db.session() as session:
        (row,) = session.execute(select(Instance)).scalars()
        assert row.sop_instance_uid == str(ds.SOPInstanceUID) and row.association_id == "recovered"
        assert row.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert catalog.reconcile()["indexed"] == 0


def test_association_rows(catalog: Catalog) -> None:
    catalog.association_started("x1", calling_ae="PACS", called_ae="LUNGNODE", peer="127.0.0.1")
    catalog.association_started("x2", calling_ae="PACS", called_ae="LUNGNODE", peer="127.0.0.1")
    catalog.association_ended("x1", outcome="released", instances=3, nbytes=10, failures=1,
                              calling_ae="PACS", peer="127.0.0.1", seconds=0.5)
    assert catalog.status_counts()["open_associations"] == 1
    assert catalog.close_open_associations() == 1
    assert catalog.status_counts()["open_associations"] == 0
