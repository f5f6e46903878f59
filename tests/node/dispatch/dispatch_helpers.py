"""Helpers of the dispatch tests: config files, seeded series, CLI runs, waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lungnode.node.dispatch import jobs
from lungnode.storage.db import Database
from lungnode.storage.models import Instance, Patient, Series, Study
from tests.node_process import toml_value

REPO = Path(__file__).resolve().parents[3]
#: The test processors' module, for ``python -m tests.launch --processor {PROCS}:record``.
PROCS = "tests.node.dispatch.dispatch_procs"


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write ``{"section": {key: value}}`` (dotted section names allowed) as a TOML file."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def node_env(record: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for lungnode subprocesses (run with ``cwd=REPO``): results recorded."""
    env = dict(os.environ)
    if record is not None:
        env["LUNGNODE_TEST_RECORD"] = str(record)
    env.update(extra)
    return env


def cli(config: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``lungnode --config CONFIG ARGS…`` and return the finished process."""
    return subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(config), *args],
                          capture_output=True, text=True, env=env or node_env(), timeout=timeout,
                          cwd=REPO)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
             what: str = "condition", detail: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it or fail after ``timeout``.

    ``detail`` adds text to the failure (e.g. the tail of a node's log), read when it fails.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(interval)


def seed_series(db: Database, count: int, slices: int = 3, prefix: str = "1.2.826.0.1.3680043.9.7777"
                ) -> list[int]:
    """Insert ``count`` series rows with ``slices`` instance rows each and queue a job for each.

    Used where the test is about workers claiming jobs, not about receiving.
    """
    model = jobs.ModelIdentity("lungnode-test", "1")
    job_pks = []
    with db.session() as s:
        patient = Patient(patient_id="SEED", issuer="")
        s.add(patient)
        s.flush()
        study = Study(study_uid=f"{prefix}.1", patient_pk=patient.id)
        s.add(study)
        s.flush()
        for n in range(count):
            series = Series(series_uid=f"{prefix}.2.{n}", study_pk=study.id, modality="CT",
                            state="complete", decision="include", decision_rule="seed")
            s.add(series)
            s.flush()
            for k in range(slices):
                s.add(Instance(series_pk=series.id, sop_instance_uid=f"{prefix}.3.{n}.{k}",
                               sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT",
                               instance_number=k + 1, path=f"seed/{n}/{k}.dcm", size_bytes=0,
                               sha256="0" * 64))
            s.flush()
            job_pks.append(jobs.enqueue_series(s, series, model).job_pk)
    return job_pks


def clone_series(files: list[Path], out_dir: Path, *, series_uid: str | None = None,
                 drop: tuple[int, ...] = (), edit: Callable[[Any], None] | None = None) -> list[Path]:
    """Copy real slices as a new series (new Series/SOP Instance UIDs), leaving out InstanceNumbers
    in ``drop`` and applying ``edit(dataset)`` to each copy."""
    import pydicom
    from pydicom.uid import generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    written = []
    for path in sorted(files):
        ds = pydicom.dcmread(path)
        if int(ds.InstanceNumber) in drop:
            continue
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if edit is not None:
            edit(ds)
        target = out_dir / f"{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(target)
        written.append(target)
    return written


def storescu(port: int, files: list[Path], env: dict[str, str], aet: str = "STORESCU") -> None:
    """Send files with DCMTK storescu over one association (raises on failure)."""
    subprocess.run(["storescu", "-aet", aet, "-aec", "LUNGNODE", "127.0.0.1", str(port),
                    *map(str, files)], check=True, env=env, capture_output=True, timeout=120)


def read_jobs(db: Database, series_uid: str | None = None) -> list[dict[str, Any]]:
    """Job rows as dicts (oldest first)."""
    from sqlalchemy import select

    from lungnode.storage.models import Job

    with db.session() as s:
        query = select(Job).order_by(Job.id)
        if series_uid:
            query = query.where(Job.series_uid == series_uid)
        return [{c.name: getattr(j, c.name) for c in Job.__table__.columns} for j in s.scalars(query)]


def read_series(db: Database, series_uid: str) -> dict[str, Any] | None:
    """The series row as a dict, or ``None``."""
    from sqlalchemy import select

    with db.session() as s:
        row = s.scalar(select(Series).where(Series.series_uid == series_uid))
        return None if row is None else {c.name: getattr(row, c.name) for c in Series.__table__.columns}


def records(path: Path) -> list[dict[str, Any]]:
    """Lines the test processor appended."""
    import json

    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
