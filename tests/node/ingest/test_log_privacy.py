"""Issue 20, item 5: no patient data in the log above DEBUG, every line bounded and ASCII.

pydicom's warnings about malformed values quote the value; a data set whose Instance Number and
Series Number hold the patient's name (and 60,000 characters) used to put both into WARNING lines
on stderr. The node's log (its stderr, as under systemd) must not contain the name, any line
longer than the bound, or a non-ASCII character.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from lungnode.logs import MAX_LINE_CHARS, BoundedFormatter, PrivacyFilter, bound_text, where_raised
from tests.node_process import LungnodeProcess, send_files

MARK = "ZZPRIVACY^SECRET"


def test_bound_text_escapes_and_cuts() -> None:
    text = bound_text("M\u00fcller \x1b[31m" + "x" * 5000 + "\nnext line")
    first, second = text.split("\n")
    assert text.isascii() and "\\xfc" in first and "\\x1b" in first
    assert len(first) < MAX_LINE_CHARS + 40 and first.endswith("characters cut]")
    assert second == "next line"


def test_privacy_filter_keeps_pydicom_and_warnings_out_above_debug() -> None:
    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    info = PrivacyFilter(logging.INFO)
    assert not info.filter(record("py.warnings", logging.WARNING, f"Invalid value for VR IS: '{MARK}'"))
    assert not info.filter(record("pydicom.valuerep", logging.WARNING, MARK))
    error = record("pydicom", logging.ERROR, MARK)
    assert info.filter(error) and MARK not in error.getMessage()
    assert info.filter(record("lungnode.node.ingest", logging.WARNING, "C-STORE refused"))
    assert PrivacyFilter(logging.DEBUG).filter(record("py.warnings", logging.WARNING, MARK))
    formatted = BoundedFormatter("%(message)s").format(record("x", logging.ERROR, "\u00e9" * 3000))
    assert formatted.isascii() and len(formatted) < MAX_LINE_CHARS + 40


def test_where_raised_names_type_and_place_not_the_text() -> None:
    try:
        raise ValueError(MARK)
    except ValueError as exc:
        where = where_raised(exc)
    assert where.startswith("ValueError in ") and MARK not in where and ".py:" in where


def test_malformed_values_leave_no_patient_data_in_the_node_log(node: LungnodeProcess,
                                                                chest_ct_dir: Path,
                                                                tmp_path: Path) -> None:
    ds = copy.deepcopy(pydicom.dcmread(sorted(chest_ct_dir.glob("*.dcm"))[3]))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = MARK, "ZZPRIVACYID1"
    ds.InstanceNumber = "1234567890123456"  # replaced below by the name (same length)
    ds.SeriesNumber = "123456789012"  # replaced below by 60,000 characters
    path = tmp_path / "malformed.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    raw = raw.replace(b"1234567890123456", MARK.encode().ljust(16))
    long_value = ("\u00e9" * 30000).encode("latin-1") + MARK.encode() * 1875  # 60,000 bytes
    head = raw.index(b"\x20\x00\x11\x00IS")  # (0020,0011) Series Number: short explicit length
    # An IS with a 2-byte length cannot hold 60,000 bytes: write it as UN with a 4-byte length.
    old_len = int.from_bytes(raw[head + 6:head + 8], "little")
    raw = raw[:head] + b"\x20\x00\x11\x00UN\x00\x00" + len(long_value).to_bytes(4, "little") + \
        long_value + raw[head + 8 + old_len:]
    path.write_bytes(raw)
    statuses = send_files(node.port, [path], calling_ae="TESTSCU")
    assert statuses[0] is not None
    log = node.log()
    assert MARK not in log and "ZZPRIVACY" not in log and "ZZPRIVACYID1" not in log
    assert log.isascii()
    assert max(len(line) for line in log.splitlines()) < MAX_LINE_CHARS + 40
    assert "Invalid value for VR" not in log
