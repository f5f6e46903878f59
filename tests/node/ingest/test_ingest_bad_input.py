"""Bad input, duplicates and the disk watermark: each refused instance by instance with a status and a
logged reason, nothing partial left; duplicates and new versions handled as documented."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from lungnode.storage.models import AuditEvent, Series
from tests.node.ingest.conftest import instance_rows, storescu, with_db
from tests.node_process import LungnodeProcess, send_files, stored_files

SC = "1.2.840.10008.5.1.4.1.1.7"


def _copy(src: Path, dst: Path, edit: Callable[[pydicom.Dataset], None] | None = None,
          new_uids: bool = True) -> Path:
    ds = pydicom.dcmread(src)
    if new_uids:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if edit:
        edit(ds)
    ds.save_as(dst, enforce_file_format=False)
    return dst


def _no_leftovers(node: LungnodeProcess) -> None:
    assert list((node.root / ".tmp").iterdir()) == []


def test_abdomen_with_empty_uids_refused_instance_by_instance(node: LungnodeProcess,
                                                             shared_data: Path) -> None:
    folder = shared_data / "ct" / "abdomen-20-slices-j2k-empty-uids"
    files = sorted(folder.iterdir())
    before = len(stored_files(node.root))
    assert send_files(node.port, files) == [0xA900] * 20
    assert len(stored_files(node.root)) == before
    assert node.log().count("C-STORE refused with 0xA900: SOPClassUID is empty") >= 20
    audits = with_db(node, lambda s: list(s.execute(select(AuditEvent).where(
        AuditEvent.event == "rejected")).scalars()))
    assert sum(a.details.get("reason") == "SOPClassUID is empty" for a in audits) >= 20
    _no_leftovers(node)


def test_sop_class_mismatch_and_ct_without_pixels(node: LungnodeProcess, chest_ct_dir: Path,
                                                  tmp_path: Path) -> None:
    src = sorted(chest_ct_dir.glob("*.dcm"))[0]

    def other_class(ds: pydicom.Dataset) -> None:
        ds.SOPClassUID = SC  # the request (file meta) still says CT Image Storage

    def no_pixels(ds: pydicom.Dataset) -> None:
        del ds.PixelData

    def bad_series_uid(ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = "1.2.3/../../etc"

    files = [_copy(src, tmp_path / "mismatch.dcm", other_class),
             _copy(src, tmp_path / "nopixels.dcm", no_pixels),
             _copy(src, tmp_path / "baduid.dcm", bad_series_uid)]
    assert send_files(node.port, files) == [0xA900, 0xA900, 0xA900]
    log = node.log()
    assert "SOPClassUID differs from the affected SOP class" in log
    assert "image without pixel data" in log
    assert "SeriesInstanceUID is not a valid UID" in log
    for f in files:
        assert instance_rows(node, sop_instance_uid=str(pydicom.dcmread(f).SOPInstanceUID)) == []
    _no_leftovers(node)


def test_truncated_input_cannot_be_understood(node: LungnodeProcess, chest_ct_dir: Path, shared_data: Path,
                                             tmp_path: Path) -> None:
    native = _copy(sorted(chest_ct_dir.glob("*.dcm"))[1], tmp_path / "native.dcm")
    cut_native = tmp_path / "cut-native.dcm"
    cut_native.write_bytes(native.read_bytes()[:200_000])
    j2k = (shared_data / "transfer-syntaxes" / "693_J2KR.dcm").read_bytes()
    cut_j2k = tmp_path / "cut-j2k.dcm"
    cut_j2k.write_bytes(j2k[:-5000])
    header_only = tmp_path / "cut-header.dcm"
    header_only.write_bytes(native.read_bytes()[:1000])  # cut inside the header
    statuses = send_files(node.port, [cut_native, cut_j2k, header_only])
    assert statuses == [0xC000, 0xC000, 0xC000]
    log = node.log()
    assert "pixel data truncated" in log and "encapsulated pixel data truncated" in log
    assert "unreadable header" in log
    _no_leftovers(node)


def test_duplicates_identical_and_different(node: LungnodeProcess, chest_ct_dir: Path,
                                            tmp_path: Path) -> None:
    first = _copy(sorted(chest_ct_dir.glob("*.dcm"))[2], tmp_path / "v1.dcm")
    uid = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    assert send_files(node.port, [first, first]) == [0, 0]
    (row,) = instance_rows(node, sop_instance_uid=uid)
    assert row.version == 1 and row.current
    files = [f for f in stored_files(node.root) if f.name.startswith(uid)]
    assert [f.name for f in files] == [f"{uid}.dcm"]

    # Identical resend of an instance of a completed series does not re-arm completion.
    with_db(node, lambda s: s.execute(update(Series).where(Series.id == row.series_pk)
                                      .values(state="complete", completion_due_at=None)))
    assert send_files(node.port, [first]) == [0]
    series = with_db(node, lambda s: s.execute(select(Series).where(Series.id == row.series_pk)).scalar_one())
    assert series.state == "complete" and series.completion_due_at is None

    def changed(ds: pydicom.Dataset) -> None:
        ds.SeriesDescription = "changed after the first send"

    second = _copy(first, tmp_path / "v2.dcm", changed, new_uids=False)
    assert send_files(node.port, [second]) == [0]
    rows = sorted(instance_rows(node, sop_instance_uid=uid), key=lambda r: r.version)
    assert [(r.version, r.current) for r in rows] == [(1, False), (2, True)]
    assert rows[1].path.endswith(f"{uid}.v2.dcm")
    assert (node.root / rows[1].path).read_bytes() != (node.root / rows[0].path).read_bytes()
    assert "received again with different bytes: stored as version 2" in node.log()
    audit = with_db(node, lambda s: list(s.execute(select(AuditEvent).where(
        AuditEvent.event == "instance_version")).scalars()))
    assert any(a.details["sop_instance_uid"] == uid and a.details["version"] == 2 for a in audit)
    # A new version is a new instance: the completed series is receiving again, timer re-armed.
    series = with_db(node, lambda s: s.execute(select(Series).where(Series.id == row.series_pk)).scalar_one())
    assert series.state == "receiving"
    assert series.completion_due_at - series.last_received_at == dt.timedelta(seconds=3600)


@pytest.mark.parametrize("sender", ["storescu", "raw"])
def test_disk_watermark_answers_a700(make_node: Callable[..., LungnodeProcess], chest_ct_dir: Path,
                                     dcmtk_env: dict[str, str], sender: str) -> None:
    node = make_node({"storage": {"min_free_disk_mb": 10**9}})
    files = sorted(chest_ct_dir.glob("*.dcm"))[:2]
    if sender == "raw":
        assert send_files(node.port, files) == [0xA700, 0xA700]
    else:
        result = storescu(node.port, files, dcmtk_env, extra=["-v"])
        out = result.stdout + result.stderr
        assert result.returncode != 0 and out.count("Refused: OutOfResources") == 1, out
    assert stored_files(node.root) == [] and instance_rows(node) == []
    _no_leftovers(node)
    assert "C-STORE refused with 0xA700" in node.log()
