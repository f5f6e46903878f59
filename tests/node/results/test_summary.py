"""The one-page summary as a Secondary Capture and an Encapsulated PDF: valid (dciodvfy),
referenced, labelled, and the page shows what the report says."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungnode.inference.comparison import Comparison, PriorFigures, impression, report_to_dict
from lungnode.inference.report import severity_for
from lungnode.inference.types import InferenceResult
from lungnode.node.results.build import BuiltOutput, Profile, build_outputs
from lungnode.node.results.common import OutputContext
from lungnode.node.results.summary_page import LEVEL_RGB, PAGE_SIZE
from lungnode.provenance import is_own_output
from tests.orthanc import OrthancServer


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def outputs(chest_result: InferenceResult) -> list[BuiltOutput]:
    ctx = OutputContext(job_id=7, model=chest_result.model, series_number_base=9100)
    return build_outputs(chest_result, ctx, Profile(objects=("summary", "pdf")))


def test_default_profile_adds_summary_to_seg_and_sr() -> None:
    assert Profile().objects == ("seg", "sr", "summary")


def test_summary_sc_is_valid_and_labelled(tmp_path: Path, chest_result: InferenceResult,
                                          outputs: list[BuiltOutput]) -> None:
    assert [o.kind for o in outputs] == ["summary", "pdf"]
    sc = outputs[0]
    path = tmp_path / "summary.dcm"
    path.write_bytes(sc.data)
    assert _dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.SeriesNumber == 9103
    assert ds.BurnedInAnnotation == "YES" and "NOT FOR PRIMARY DIAGNOSIS" in ds.ImageComments
    assert is_own_output(ds)
    src = pydicom.dcmread(chest_result.volume.source_files[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    uids = set(chest_result.volume.sop_instance_uids)
    refs = [r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence]
    assert 1 <= len(refs) <= 4 and set(refs) <= uids
    pixels = ds.pixel_array
    assert pixels.shape == (PAGE_SIZE[1], PAGE_SIZE[0], 3)
    # the infiltrate outline and the region tints are on the page; the warning is yellow text
    assert np.any(np.all(pixels == (255, 80, 0), axis=-1))
    assert np.any(np.all(pixels[:64] == (255, 220, 0), axis=-1))
    assert len(LEVEL_RGB) == 3


def test_pdf_is_valid_encapsulated_document(tmp_path: Path, outputs: list[BuiltOutput]) -> None:
    pdf = outputs[1]
    path = tmp_path / "pdf.dcm"
    path.write_bytes(pdf.data)
    assert _dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf" and ds.SeriesNumber == 9104
    data = bytes(ds.EncapsulatedDocument)
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-64:]
    assert is_own_output(ds)


def test_impression_and_comparison_text(chest_result: InferenceResult) -> None:
    report = severity_for(chest_result)
    text = impression(report)
    assert "Right-sided" in text and f"/{report.max_score}" in text
    assert "zones" in text and "Pan" in text
    prior = PriorFigures.from_report_dict(report_to_dict(report), "20261102", "1.2.3", "job 1")
    same = Comparison.of(prior, "20261106")
    assert same.days == 4 and same.po_change(report) == pytest.approx(
        report.both.po - round(report.both.po, 2))
    assert "Unchanged from" in impression(report, same) and "2026-11-02" in impression(report, same)
    lower = PriorFigures(**{**prior.__dict__, "po": report.both.po - 5.0})
    assert "Up from" in impression(report, Comparison.of(lower, "20261106"))
    higher = PriorFigures(**{**prior.__dict__, "po": report.both.po + 5.0})
    assert "Down from" in impression(report, Comparison.of(higher, "20261106"))
    none = Comparison.none("No comparison: the Patient ID is missing.")
    assert impression(report, none).endswith("No comparison: the Patient ID is missing.")
    # a trace still scores in its region, so the text says "traces", not "none"
    lung = report.both.lung_ml
    trace = dataclasses.replace(report, both=dataclasses.replace(report.both, infiltrate_ml=lung * 1e-4))
    assert impression(trace).startswith("Only traces of lung opacity found by the model (")
    nothing = dataclasses.replace(report, both=dataclasses.replace(report.both, infiltrate_ml=0.0))
    assert impression(nothing).startswith("No lung opacity found by the model;")


def test_orthanc_stores_summary_and_pdf(tmp_path: Path, orthanc: OrthancServer,
                                        chest_result: InferenceResult) -> None:
    """Built, stored and sent by the node's own code; Orthanc keeps the page and the PDF in the
    source study."""
    from lungnode.config import parse_config
    from lungnode.node.results.delivery import DeliverySender
    from tests.node.results.test_results_delivery import drain, node_config, setup_job

    config = parse_config(node_config(tmp_path, orthanc.dicom_port,
                                      '["sr", "summary", "pdf"]').read_text())
    db, store, job_pk = setup_job(config, chest_result)
    d = drain(DeliverySender(config, db, store), db, job_pk)
    assert d.state == "sent" and len(d.acknowledged) == 3
    tags = [orthanc.instance_tags(i) for i in orthanc.wait_for_instances(3)]
    by_modality = {t["Modality"]: t for t in tags}
    assert set(by_modality) == {"SR", "OT", "DOC"}
    assert by_modality["OT"]["SeriesNumber"] == "9103"
    assert by_modality["DOC"]["MIMETypeOfEncapsulatedDocument"] == "application/pdf"
    assert by_modality["SR"]["SeriesDescription"].startswith("AI lung report PO ")
    assert orthanc.statistics()["CountStudies"] == 1


def test_sr_figures_read_back_equal_the_report(chest_result: InferenceResult) -> None:
    """What a later node reads from our SR (PACS priors) equals what it would have stored."""
    import io

    from lungnode.node.results.sr_report import read_report_figures

    report = severity_for(chest_result)
    ctx = OutputContext(job_id=3, model=chest_result.model)
    sr = next(o for o in build_outputs(chest_result, ctx, Profile(objects=("sr",)), report=report)
              if o.kind == "sr")
    figures = read_report_figures(pydicom.dcmread(io.BytesIO(sr.data)))
    assert figures is not None
    from_sr = PriorFigures.from_report_dict(figures, "20261102", "1.2", "sr")
    stored = PriorFigures.from_report_dict(report_to_dict(report), "20261102", "1.2", "sr")
    assert from_sr == stored and from_sr.max_score == 30 and from_sr.scheme == "pan"


def test_key_slices_follow_the_opacity_then_the_lung_levels(chest_result: InferenceResult) -> None:
    from lungnode.node.results.summary_page import coronal_row, key_slices

    keys = key_slices(chest_result)
    area = chest_result.infiltrate.sum(axis=(1, 2))
    assert len(keys) == 4 and len(set(keys)) == 4
    assert int(np.argmax(area)) in keys  # the most involved slice is shown
    lung_rows = np.flatnonzero(chest_result.lung_labels.any(axis=(1, 2)))
    assert all(k in lung_rows for k in keys)
    rows = np.flatnonzero(chest_result.infiltrate.any(axis=(0, 2)))
    assert rows[0] <= coronal_row(chest_result.lung_labels > 0, chest_result.infiltrate) <= rows[-1]
