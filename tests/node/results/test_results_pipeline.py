"""``process_job`` on stored instances of the real chest CT: outputs built once per destination,
deliveries queued, the quality gate holding a result, and a superseding job's SR chain.

The engine here is the threshold stand-in of ``results_factory`` (real reader, real geometry, no
model), so these tests exercise the pipeline, not the network; the model path runs in the
end-to-end test.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lungnode.config import Config, QualityGateConfig, parse_config
from lungnode.inference.types import InferenceResult
from lungnode.node.dispatch.outcome import PermanentJobError
from lungnode.node.dispatch.pipeline import process_job
from lungnode.node.dispatch.quality import check_quality
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Delivery, Instance, Job, Output, Patient, Series, Study
from tests.node.results.results_factory import make_result


class ThresholdEngine:
    """Reads the series with the real reader and masks it by threshold (no model)."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, files: list[Path]) -> InferenceResult:
        self.calls += 1
        folder = Path(files[0]).parent
        return make_result(folder)


@dataclass
class Ctx:
    config: Config
    db: Database
    store: FileStore
    engine: Any


def make_ctx(tmp_path: Path, chest_ct_dir: Path, **gate: Any) -> tuple[Ctx, str]:
    config = parse_config(f"""
[storage]
root = "{tmp_path / 'store'}"
fsync = false
min_free_disk_mb = 0
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
objects = ["seg", "sr"]
[[destinations]]
name = "legacy"
ae_title = "LEGACY"
host = "127.0.0.1"
objects = ["sc"]
""")
    if gate:
        config = dataclasses.replace(config, results=dataclasses.replace(
            config.results, quality_gate=QualityGateConfig(**gate)))
    store = FileStore(Path(config.storage.root), fsync=False)
    db = Database(config.storage.effective_database_url)
    files = sorted(chest_ct_dir.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series_uid, study_uid = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    with db.session() as s:
        patient = Patient(patient_id="x")
        s.add(patient)
        s.flush()
        study = Study(study_uid=study_uid, patient_pk=patient.id)
        s.add(study)
        s.flush()
        series = Series(series_uid=series_uid, study_pk=study.id, modality="CT", state="complete")
        s.add(series)
        s.flush()
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            rel = store.instance_relpath(study_uid, series_uid, str(ds.SOPInstanceUID))
            store.path(rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, store.path(rel))
            s.add(Instance(series_pk=series.id, sop_instance_uid=str(ds.SOPInstanceUID),
                           sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid="1.2.840.10008.1.2.1",
                           path=rel, size_bytes=f.stat().st_size, sha256="0"))
    return Ctx(config, db, store, ThresholdEngine()), series_uid


def add_job(ctx: Ctx, series_uid: str, supersedes: int | None = None, tag: str = "a") -> int:
    with ctx.db.session() as s:
        study_uid = s.scalar(select(Study.study_uid))
        job = Job(series_uid=series_uid, study_uid=study_uid, instance_set_hash=tag * 64,
                  model_id="t", model_version="1", state="running", supersedes_job_pk=supersedes)
        s.add(job)
        s.flush()
        return job.id


def outputs(ctx: Ctx, job_pk: int) -> list[Output]:
    with ctx.db.session() as s:
        rows = s.scalars(select(Output).where(Output.job_pk == job_pk).order_by(Output.id)).all()
        for r in rows:
            s.expunge(r)
        return list(rows)


def test_done_job_builds_once_per_destination_and_queues(tmp_path: Path, chest_ct_dir: Path) -> None:
    ctx, series_uid = make_ctx(tmp_path, chest_ct_dir)
    job_pk = add_job(ctx, series_uid)
    outcome = process_job(job_pk, ctx)
    assert outcome.state == "done" and outcome.measurements["quality_gate"]["passed"]
    assert outcome.measurements["both"]["lung_ml"] > 200
    rows = outputs(ctx, job_pk)
    kinds = {(r.destination, r.kind) for r in rows}
    assert kinds == {("pacs", "seg"), ("pacs", "sr"), ("legacy", "sc")}
    assert sum(r.kind == "sc" for r in rows) == 30
    assert all(ctx.store.path(r.path).is_file() for r in rows)
    with ctx.db.session() as s:
        deliveries = {d.destination: d.state for d in s.scalars(select(Delivery))}
    assert deliveries == {"pacs": "pending", "legacy": "pending"}
    # A retry of the same job (e.g. the worker died after building) reuses the stored objects.
    again = process_job(job_pk, ctx)
    assert again.state == "done"
    assert [r.sop_instance_uid for r in outputs(ctx, job_pk)] == [r.sop_instance_uid for r in rows]
    with ctx.db.session() as s:
        assert len(s.scalars(select(Delivery)).all()) == 2


def test_quality_gate_holds_with_reason(tmp_path: Path, chest_ct_dir: Path) -> None:
    ctx, series_uid = make_ctx(tmp_path, chest_ct_dir, lung_min_ml=20000.0, lung_max_ml=30000.0)
    job_pk = add_job(ctx, series_uid)
    outcome = process_job(job_pk, ctx)
    assert outcome.state == "held"
    assert "below the plausible minimum 20000 mL" in outcome.reason
    assert outputs(ctx, job_pk)  # kept for `lungnode release`
    with ctx.db.session() as s:
        assert s.scalars(select(Delivery)).all() == []


def test_superseding_job_chains_sr_and_cancels_unsent(tmp_path: Path, chest_ct_dir: Path) -> None:
    ctx, series_uid = make_ctx(tmp_path, chest_ct_dir)
    old = add_job(ctx, series_uid, tag="a")
    assert process_job(old, ctx).state == "done"
    new = add_job(ctx, series_uid, supersedes=old, tag="b")
    assert process_job(new, ctx).state == "done"
    old_sr = next(r for r in outputs(ctx, old) if r.kind == "sr")
    new_sr = next(r for r in outputs(ctx, new) if r.kind == "sr")
    ds = pydicom.dcmread(ctx.store.path(new_sr.path))
    ref = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old_sr.sop_instance_uid
    new_seg = next(r for r in outputs(ctx, new) if r.kind == "seg")
    assert new_seg.series_uid != next(r for r in outputs(ctx, old) if r.kind == "seg").series_uid
    with ctx.db.session() as s:
        states = {(d.job_pk, d.destination): d.state for d in s.scalars(select(Delivery))}
    assert states[(old, "pacs")] == "cancelled" and states[(new, "pacs")] == "pending"


def test_missing_instances_is_permanent(tmp_path: Path, chest_ct_dir: Path) -> None:
    ctx, _ = make_ctx(tmp_path, chest_ct_dir)
    job_pk = add_job(ctx, "1.2.3.4")
    with pytest.raises(PermanentJobError):
        process_job(job_pk, ctx)


def test_quality_gate_rules(chest_result: InferenceResult) -> None:
    m = chest_result.measurements
    assert check_quality(m, QualityGateConfig()).passed
    empty = dataclasses.replace(m, both=dataclasses.replace(m.both, lung_ml=0.0))
    assert check_quality(empty, QualityGateConfig()).reason == "lung mask is empty"
    big = check_quality(m, QualityGateConfig(lung_min_ml=10, lung_max_ml=100))
    assert not big.passed and "above the plausible maximum" in big.reason
    outside = dataclasses.replace(m, infiltrate_outside_lung_ml=m.both.infiltrate_ml)
    decision = check_quality(outside, QualityGateConfig(max_outside_fraction=0.2))
    assert not decision.passed and "50 % of the predicted infiltrate" in decision.reason
    # a normal chest: a few specks, a third of them outside (0.04 of 0.14 mL) is noise, not evidence
    specks = dataclasses.replace(m, both=dataclasses.replace(m.both, infiltrate_ml=0.1),
                                 infiltrate_outside_lung_ml=0.04)
    assert check_quality(specks, QualityGateConfig()).passed
    assert not check_quality(specks, QualityGateConfig(outside_min_ml=0.0)).passed
    assert check_quality(empty, QualityGateConfig(enabled=False)).passed
