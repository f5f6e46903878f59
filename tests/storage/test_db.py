"""The database layer on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from lungnode.storage.db import Database
from lungnode.storage.models import Patient, Series, Study


def _roundtrip(db: Database) -> None:
    with db.session() as s:
        patient = Patient(patient_id="P1", patient_name="Doe^Jane")
        s.add(patient)
        s.flush()
        study = Study(study_uid="1.2.3", patient_pk=patient.id)
        s.add(study)
        s.flush()
        s.add(Series(series_uid="1.2.3.4", study_pk=study.id, modality="CT"))
    with db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.modality == "CT"
        assert series.study.patient.patient_name == "Doe^Jane"
        assert series.state == "receiving"
    db.ping()


def test_sqlite_roundtrip_and_wal(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    _roundtrip(db)
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


@pytest.mark.postgres
def test_postgres_roundtrip(postgres_db_url: str) -> None:
    db = Database(postgres_db_url)
    _roundtrip(db)
    db.dispose()
