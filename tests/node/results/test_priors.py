"""Comparison with the prior exam through ``process_job``: same patient, earlier date → the SR,
the summary page and the job's figures report the prior and the change; a different patient, a
different issuer or a missing Patient ID → no comparison, and the report says why."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from lungnode.config import Config, parse_config
from lungnode.inference.types import InferenceResult
from lungnode.node.dispatch.pipeline import process_job
from lungnode.node.dispatch.priors import NO_PATIENT_ID, NO_PRIOR
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Instance, Job, Output, Patient, Series, Study
from tests.node.results.results_factory import make_result
from tests.orthanc import OrthancServer


class ThresholdEngine:
    """The real reader and threshold masks (no model)."""

    def run(self, files: list[Path]) -> InferenceResult:
        return make_result(Path(files[0]).parent)


@dataclass
class Ctx:
    config: Config
    db: Database
    store: FileStore
    engine: Any


def make_ctx(root: Path, port: int = 104, objects: str = '["seg", "sr", "summary"]',
             priors: str = "") -> Ctx:
    config = parse_config(f"""
[storage]
root = "{root / 'store'}"
fsync = false
min_free_disk_mb = 0
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {port}
objects = {objects}
[delivery]
retry_delays_s = [0.3]
timeout_s = 10.0
poll_s = 0.1
{priors}
""")
    return Ctx(config, Database(config.storage.effective_database_url),
               FileStore(Path(config.storage.root), fsync=False), ThresholdEngine())


@pytest.fixture
def ctx(tmp_path: Path) -> Ctx:
    return make_ctx(tmp_path)


def add_study(ctx: Ctx, chest_ct_dir: Path, patient_id: str, issuer: str, date: str) -> int:
    """A study of the chest CT under its own UIDs for one patient; returns its job."""
    study_uid, series_uid = str(generate_uid()), str(generate_uid())
    with ctx.db.session() as s:
        patient = s.scalar(select(Patient).where(Patient.patient_id == patient_id,
                                                 Patient.issuer == issuer))
        if patient is None:
            patient = Patient(patient_id=patient_id, issuer=issuer)
            s.add(patient)
            s.flush()
        study = Study(study_uid=study_uid, patient_pk=patient.id, study_date=date)
        s.add(study)
        s.flush()
        series = Series(series_uid=series_uid, study_pk=study.id, modality="CT", state="complete")
        s.add(series)
        s.flush()
        for f in sorted(chest_ct_dir.glob("*.dcm")):
            ds = pydicom.dcmread(f)  # the same slices as a new study of this patient
            ds.PatientID, ds.IssuerOfPatientID, ds.StudyDate = patient_id, issuer, date
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            rel = ctx.store.instance_relpath(study_uid, series_uid, str(ds.SOPInstanceUID))
            ctx.store.path(rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(ctx.store.path(rel), enforce_file_format=True)
            s.add(Instance(series_pk=series.id, sop_instance_uid=str(ds.SOPInstanceUID),
                           sop_class_uid=str(ds.SOPClassUID),
                           transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=rel,
                           size_bytes=ctx.store.path(rel).stat().st_size, sha256="0"))
        job = Job(series_uid=series_uid, study_uid=study_uid, instance_set_hash="a" * 64,
                  model_id="t", model_version="1", state="running")
        s.add(job)
        s.flush()
        return job.id


def run_job(ctx: Ctx, job_pk: int) -> dict[str, Any]:
    outcome = process_job(job_pk, ctx)
    assert outcome.state == "done"
    with ctx.db.session() as s:  # the worker marks the job done from the outcome
        job = s.get(Job, job_pk)
        assert job is not None
        job.state = "done"
    return dict(outcome.measurements)


def sr_text(ctx: Ctx, job_pk: int, tmp_path: Path) -> str:
    with ctx.db.session() as s:
        path = s.scalar(select(Output.path).where(Output.job_pk == job_pk, Output.kind == "sr"))
    assert path is not None
    if shutil.which("dsrdump") is None:
        pytest.skip("DCMTK dsrdump is not installed")
    return subprocess.run(["dsrdump", "+Pc", "+Pl", str(ctx.store.path(path))], capture_output=True,
                          text=True, check=True).stdout


def test_same_patient_earlier_study_is_compared(ctx: Ctx, chest_ct_dir: Path,
                                               tmp_path: Path) -> None:
    first = add_study(ctx, chest_ct_dir, "P1", "HOSP", "20261102")
    m1 = run_job(ctx, first)
    assert m1["prior"] == {"note": NO_PRIOR}
    assert NO_PRIOR in sr_text(ctx, first, tmp_path)
    second = add_study(ctx, chest_ct_dir, "P1", "HOSP", "20261106")
    m2 = run_job(ctx, second)
    prior = m2["prior"]
    assert prior["study_date"] == "20261102" and prior["days"] == 4
    assert prior["source"] == f"lungnode job {first}"
    assert prior["po"] == m1["report"]["lungs"][2]["po"]
    assert prior["score_change"] == 0 and abs(prior["po_change_pp"]) < 0.01
    assert m2["severity_score"] == {"total": m2["report"]["total_score"], "max": 30,
                                    "scheme": "pan", "regions": "zones"}
    with ctx.db.session() as s:
        job = s.get(Job, second)
        assert job is not None and job.score == m2["report"]["total_score"]  # pages, webhooks
    text = sr_text(ctx, second, tmp_path)
    assert '(LN0010,99LUNGNODE,"Change in percent of lung involved since prior")' in text
    assert '(LN0012,99LUNGNODE,"Days since prior study")="4.0" (d,UCUM,"day")' in text
    assert "Unchanged from" in text and "2026-11-02 (4 days earlier" in text
    with ctx.db.session() as s:
        kinds = set(s.scalars(select(Output.kind).where(Output.job_pk == second)))
    assert kinds == {"seg", "sr", "summary"}
    # A later study of another issuer's patient with the same ID is not compared.
    other_issuer = add_study(ctx, chest_ct_dir, "P1", "OTHER", "20261110")
    assert run_job(ctx, other_issuer)["prior"] == {"note": NO_PRIOR}


def test_other_patient_or_missing_id_is_not_compared(ctx: Ctx, chest_ct_dir: Path,
                                                    tmp_path: Path) -> None:
    run_job(ctx, add_study(ctx, chest_ct_dir, "P1", "", "20261102"))
    other = add_study(ctx, chest_ct_dir, "P2", "", "20261106")
    assert run_job(ctx, other)["prior"] == {"note": NO_PRIOR}
    anonymous = add_study(ctx, chest_ct_dir, "", "", "20261108")
    assert run_job(ctx, anonymous)["prior"] == {"note": NO_PATIENT_ID}
    assert "Patient ID is missing" in sr_text(ctx, anonymous, tmp_path)


def test_priors_off_says_nothing(ctx: Ctx, chest_ct_dir: Path) -> None:
    import dataclasses

    from lungnode.config import PriorsConfig

    ctx.config = dataclasses.replace(ctx.config, priors=PriorsConfig(source="off"))
    run_job(ctx, add_study(ctx, chest_ct_dir, "P1", "", "20261102"))
    m = run_job(ctx, add_study(ctx, chest_ct_dir, "P1", "", "20261106"))
    assert "prior" not in m and "report" in m


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    """Orthanc that lets our AE title query (C-FIND) and retrieve (C-GET)."""
    if not OrthancServer.available():
        pytest.skip("Orthanc is not installed")
    server = OrthancServer(tmp_path / "orthanc")
    server.write_config()
    config = json.loads(server.config_path.read_text())
    config["DicomModalities"] = {"lungnode": {
        "AET": "LUNGNODE", "Host": "127.0.0.1", "Port": 104, "AllowEcho": True,
        "AllowFind": True, "AllowGet": True, "AllowMove": True, "AllowStore": True}}
    server.config_path.write_text(json.dumps(config))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_prior_from_the_pacs_same_patient_only(tmp_path: Path, pacs: OrthancServer,
                                               chest_ct_dir: Path) -> None:
    """Node A reported the first study and sent its SR to the PACS; node B (a new node, no local
    results) finds it with C-FIND, fetches it with C-GET and compares; another patient or another
    issuer gets no comparison."""
    from lungnode.node.results.delivery import DeliverySender
    from tests.node.results.test_results_delivery import drain

    node_a = make_ctx(tmp_path / "a", pacs.dicom_port, '["sr"]')
    first = add_study(node_a, chest_ct_dir, "P1", "HOSP", "20261102")
    m1 = run_job(node_a, first)
    assert drain(DeliverySender(node_a.config, node_a.db, node_a.store), node_a.db,
                 first).state == "sent"
    assert len(pacs.wait_for_instances(1)) == 1

    priors = '[priors]\nsource = "pacs"\ndestination = "pacs"'
    node_b = make_ctx(tmp_path / "b", pacs.dicom_port, '["sr"]', priors)
    m2 = run_job(node_b, add_study(node_b, chest_ct_dir, "P1", "HOSP", "20261106"))
    prior = m2["prior"]
    assert prior["source"].startswith("PACS pacs, SR ")
    assert prior["study_date"] == "20261102" and prior["days"] == 4
    assert prior["po"] == m1["report"]["lungs"][2]["po"]
    assert prior["total_score"] == m1["report"]["total_score"] and prior["score_change"] == 0

    other = run_job(node_b, add_study(node_b, chest_ct_dir, "P2", "HOSP", "20261106"))
    assert other["prior"] == {"note": "No prior exam of this patient in lungnode's results or "
                                      "on pacs."}
    issuer = run_job(node_b, add_study(node_b, chest_ct_dir, "P1", "OTHER", "20261107"))
    assert "prior" in issuer and "study_date" not in issuer["prior"]


def test_unreachable_pacs_is_said(tmp_path: Path, chest_ct_dir: Path) -> None:
    from tests.orthanc import free_port

    priors = '[priors]\nsource = "pacs"\ndestination = "pacs"'
    node = make_ctx(tmp_path, free_port(), '["sr"]', priors)
    m = run_job(node, add_study(node, chest_ct_dir, "P1", "", "20261106"))
    assert m["prior"]["note"].endswith("The PACS pacs could not be asked.")
