"""Fixtures for the operations tests: a config on a temp storage root and a filled database."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from lungnode.config import Config, parse_config
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Delivery, Instance, Job, Output, Patient, Series, Study, utcnow
from tests.conftest import free_port


def make_config(root: Path, **sections: dict[str, object]) -> Config:
    """A validated config on ``root`` with free ports; ``sections`` override keys per table."""
    tables: dict[str, dict[str, object]] = {
        "node": {"bind": "127.0.0.1", "port": free_port()},
        "storage": {"root": str(root), "min_free_disk_mb": 1, "fsync": False},
        "metrics": {"bind": "127.0.0.1", "port": free_port()},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
    return parse_config("\n".join(lines) + "\n", source="test")


def http_get(url: str, timeout: float = 15.0) -> tuple[int, str]:
    """GET ``url``; return (status, body) also for 4xx/5xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in Prometheus text format (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


@pytest.fixture
def ops_config(tmp_path: Path) -> Config:
    """A config whose storage root is a fresh temp folder."""
    return make_config(tmp_path / "store")


@pytest.fixture
def ops_db(ops_config: Config) -> Database:
    """The SQLite database of :func:`ops_config`."""
    db = Database(ops_config.storage.effective_database_url)
    yield db  # type: ignore[misc]
    db.dispose()


class Filler:
    """Writes real rows and real files: series with instances, jobs with outputs and deliveries."""

    def __init__(self, db: Database, store: FileStore) -> None:
        self.db = db
        self.store = store
        self.n = 0

    def series(self, *, days_old: float, n_files: int = 3, size: int = 4096, state: str = "complete",
               study_uid: str | None = None) -> str:
        """A received series ``days_old`` days ago with ``n_files`` instance files."""
        self.n += 1
        at = utcnow() - dt.timedelta(days=days_old)
        study_uid = study_uid or f"1.2.826.0.1.3680043.10.999.{self.n}"
        series_uid = f"{study_uid}.{self.n}.1"
        with self.db.session() as s:
            patient = Patient(patient_id=f"P{self.n}", patient_name="Doe^Jane")
            s.add(patient)
            s.flush()
            study = s.query(Study).filter_by(study_uid=study_uid).one_or_none()
            if study is None:
                study = Study(study_uid=study_uid, patient_pk=patient.id)
                s.add(study)
                s.flush()
            series = Series(series_uid=series_uid, study_pk=study.id, modality="CT", state=state,
                            first_received_at=at, last_received_at=at)
            s.add(series)
            s.flush()
            for i in range(n_files):
                sop = f"{series_uid}.{i + 1}"
                rel = self.store.instance_relpath(study_uid, series_uid, sop)
                data = os.urandom(size)
                path = self.store.write_bytes(rel, data)
                os.utime(path, (at.timestamp(), at.timestamp()))
                s.add(Instance(series_pk=series.id, sop_instance_uid=sop,
                               sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               transfer_syntax_uid="1.2.840.10008.1.2.1", path=rel, size_bytes=size,
                               sha256=hashlib.sha256(data).hexdigest(), received_at=at))
        return series_uid

    def job(self, series_uid: str, *, state: str, days_old: float, deliveries: tuple[str, ...] = (),
            outputs: int = 2) -> int:
        """A job for ``series_uid`` finished ``days_old`` days ago, with output files and deliveries."""
        at = utcnow() - dt.timedelta(days=days_old)
        with self.db.session() as s:
            job = Job(series_uid=series_uid, study_uid=series_uid.rsplit(".", 2)[0],
                      instance_set_hash=hashlib.sha256(series_uid.encode()).hexdigest(), model_id="m",
                      model_version="1", state=state, created_at=at, finished_at=at, last_instance_at=at)
            s.add(job)
            s.flush()
            for i in range(outputs):
                sop = f"{series_uid}.9{i}"
                rel = self.store.output_relpath(job.id, "seg" if i == 0 else "sr", sop)
                path = self.store.write_bytes(rel, os.urandom(2048))
                os.utime(path, (at.timestamp(), at.timestamp()))
                s.add(Output(job_pk=job.id, kind="seg" if i == 0 else "sr", sop_class_uid="1.2.3",
                             sop_instance_uid=sop, series_uid=f"{series_uid}.99",
                             transfer_syntax_uid="1.2.840.10008.1.2.1", path=rel, created_at=at))
            for i, dstate in enumerate(deliveries):
                s.add(Delivery(job_pk=job.id, destination=f"d{i}", state=dstate,
                               delivered_at=at if dstate == "sent" else None))
            return int(job.id)


@pytest.fixture
def filler(ops_config: Config, ops_db: Database) -> Filler:
    """A :class:`Filler` on the test database and storage root."""
    return Filler(ops_db, FileStore(ops_config.storage.root_path, fsync=False))


FillerFactory = Callable[..., str]
