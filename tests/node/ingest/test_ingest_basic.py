"""C-ECHO and C-STORE from DCMTK into a real ``lungnode run``: files, rows, association rows, status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from sqlalchemy import select

from lungnode.provenance import add_provenance
from lungnode.storage.models import AssociationRecord, AuditEvent, Series
from tests.node.ingest.conftest import instance_rows, storescu, with_db
from tests.node_process import LungnodeProcess, dataset_bytes, send_files, stored_files


def test_echoscu(node: LungnodeProcess, dcmtk_env: dict[str, str]) -> None:
    result = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", "LUNGNODE", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, env=dcmtk_env, timeout=60)
    assert result.returncode == 0, result.stderr


def test_storescu_chest_series(node: LungnodeProcess, chest_ct_dir: Path, dcmtk_env: dict[str, str]) -> None:
    result = storescu(node.port, [chest_ct_dir], dcmtk_env)
    assert result.returncode == 0, result.stderr
    sources = sorted(chest_ct_dir.glob("*.dcm"))
    first = pydicom.dcmread(sources[0], stop_before_pixels=True)
    rows = instance_rows(node, association_id=_last_assoc(node, "STORESCU").id)
    assert len(rows) == len(sources) == 30
    by_uid = {r.sop_instance_uid: r for r in rows}
    for src in sources:
        ds = pydicom.dcmread(src)
        row = by_uid[str(ds.SOPInstanceUID)]
        stored = node.root / row.path
        assert row.path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert stored.is_file() and stored.stat().st_size == row.size_bytes
        # storescu re-encodes sequences with explicit lengths, so compare content, and pixel bytes exactly.
        back = pydicom.dcmread(stored)
        assert back.PixelData == ds.PixelData
        assert back == ds
        assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert row.calling_ae == "STORESCU" and row.current and row.version == 1
        assert row.modality == "CT" and row.rows == 512 and row.columns == 512
        assert row.kernel == str(ds.ConvolutionKernel) and row.slice_thickness == float(ds.SliceThickness)
        assert row.image_position == "\\".join(str(v) for v in ds.ImagePositionPatient)
        assert row.instance_number == int(ds.InstanceNumber)
    series = with_db(node, lambda s: s.execute(select(Series).where(
        Series.series_uid == str(first.SeriesInstanceUID))).scalar_one())
    assert series.state == "receiving" and series.completion_due_at is not None
    assert series.completion_due_at > series.last_received_at
    assert not series.own_output


def _last_assoc(node: LungnodeProcess, calling_ae: str) -> AssociationRecord:
    def query(session: object) -> AssociationRecord:
        return session.execute(select(AssociationRecord)  # type: ignore[attr-defined]
                               .where(AssociationRecord.calling_ae == calling_ae)
                               .order_by(AssociationRecord.started_at.desc())).scalars().first()
    return with_db(node, query)


def test_association_row_and_audit(node: LungnodeProcess, shared_data: Path,
                                   dcmtk_env: dict[str, str]) -> None:
    folder = shared_data / "ct" / "ct-2-slices"
    result = storescu(node.port, [folder], dcmtk_env)
    assert result.returncode == 0, result.stderr
    record = _last_assoc(node, "STORESCU")
    total = sum((node.root / r.path).stat().st_size for r in instance_rows(node, association_id=record.id))
    assert record.outcome == "released" and record.ended_at is not None
    assert record.instances == 2 and record.failures == 0 and record.bytes == total
    assert record.peer == "127.0.0.1" and record.called_ae == "LUNGNODE"
    events = with_db(node, lambda s: list(s.execute(select(AuditEvent).where(
        AuditEvent.event == "association")).scalars()))
    assert any(e.details.get("association_id") == record.id and e.details["instances"] == 2 for e in events)
    log = node.log()
    assert f"association {record.id} released: calling AE STORESCU" in log


def test_ct_and_seg_pair(node: LungnodeProcess, shared_data: Path, dcmtk_env: dict[str, str]) -> None:
    folder = shared_data / "ct" / "ct-3-slices-with-seg"
    result = storescu(node.port, [folder], dcmtk_env)
    assert result.returncode == 0, result.stderr
    seg = pydicom.dcmread(folder / "seg-liver.dcm", stop_before_pixels=True)
    (row,) = instance_rows(node, sop_instance_uid=str(seg.SOPInstanceUID))
    assert row.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4" and row.modality == "SEG"
    assert len(instance_rows(node, series_pk=row.series_pk)) == 1


def test_raw_bytes_kept_as_sent(node: LungnodeProcess, chest_ct_dir: Path, tmp_path: Path) -> None:
    """A sender that sends the file's own bytes: the stored data set is byte-identical."""
    # A copy with an undefined-length sequence, which storescu would have re-encoded.
    src = sorted(chest_ct_dir.glob("*.dcm"))[5]
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy = tmp_path / "raw.dcm"
    ds.save_as(copy, enforce_file_format=True)
    assert send_files(node.port, [copy]) == [0]
    (row,) = instance_rows(node, sop_instance_uid=str(ds.SOPInstanceUID))
    assert dataset_bytes(node.root / row.path) == dataset_bytes(copy)
    assert row.calling_ae == "TESTSCU"


def test_status_json_counts(node: LungnodeProcess) -> None:
    files = stored_files(node.root)
    status = node.status()
    assert status["instance_files"] == len(files)
    assert status["instances"] == len({f.name.split(".v")[0].removesuffix(".dcm") for f in files})
    assert status["series_total"] == len({f.parent for f in files})
    assert status["studies"] == len({f.parent.parent for f in files})
    assert status["disk_free_bytes"] > 0 and status["open_associations"] == 0
    human = node.cli("status").stdout
    assert f"instances        {status['instances']}" in human


def test_own_output_flag(node: LungnodeProcess, chest_ct_dir: Path, tmp_path: Path) -> None:
    """An object carrying our provenance block marks its series as our own output (loop protection)."""
    ds = pydicom.dcmread(sorted(chest_ct_dir.glob("*.dcm"))[7])
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    add_provenance(ds, job_id=7, model="lungnode-demo 0.1.0", source_series_uid="1.2.3.4")
    path = tmp_path / "ours.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert send_files(node.port, [path]) == [0]
    series = with_db(node, lambda s: s.execute(select(Series).where(
        Series.series_uid == str(ds.SeriesInstanceUID))).scalar_one())
    assert series.own_output


def test_run_refuses_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 70000\n")
    result = subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(bad), "run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "node.port" in result.stderr
