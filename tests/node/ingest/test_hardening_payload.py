"""Issue 20, item 4: pixel data, trailing bytes and encoding checked before anything is acknowledged.

Each case starts from a real slice of the 30-slice chest CT and breaks one thing; the header
parser (:func:`lungnode.node.ingest.policy.parse_header`, the C-STORE hot path, no pixel decoding) must
refuse it with the documented status and a reason, and accept the sound variants (odd length with
its padding byte, trailing padding element, deflated). The last test sends some through a running
node and reads what it acknowledged back with pydicom and DCMTK ``dcmdump``.
"""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, generate_uid

from lungnode.node.dimse.pdu import Command
from lungnode.node.ingest.policy import ParsedHeader, Refusal, parse_header
from lungnode.node.ingest.store import file_prefix
from tests.node_process import LungnodeProcess, send_files, stored_files

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def _encode(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.fixture(scope="module")
def slice_ds(shared_data: Path) -> Dataset:
    return pydicom.dcmread(sorted((shared_data / "ct" / "chest-30-slices-uncompressed").glob("*.dcm"))[0])


def _size(ds: Dataset, rows: int, columns: int) -> None:
    ds.Rows, ds.Columns = rows, columns


def _small(ds: Dataset, pixels: bytes) -> None:
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 3, 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels


def _flip_item_tag(data: bytes) -> bytes:
    """The first sequence item tag (FFFE,E000) turned into (FFFE,E200), as a bit flip would."""
    i = data.index(b"\xfe\xff\x00\xe0")
    return data[:i] + b"\xfe\xff\x00\xe2" + data[i + 4:]


def _encapsulated(ds: Dataset, items: bytes) -> bytes:
    del ds.PixelData
    return _encode(ds) + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + items + \
        b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _float(ds: Dataset) -> None:
    del ds.PixelData
    ds.FloatPixelData = np.zeros(int(ds.Rows) * int(ds.Columns), np.float32).tobytes()


#: A Digital Signatures Sequence (FFFA,FFFA) of undefined length whose item is never closed.
UNCLOSED_SEQUENCE = b"\xfa\xff\xfa\xffSQ\0\0\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
#: name → (edit of the data set, how it is encoded, transfer syntax, expected status, reason part).
#: Status None: accepted.
Edit = Callable[[Dataset], None]
CASES: dict[str, tuple[Edit | None, Callable[[Dataset], bytes], str, int | None, str]] = {
    "sound": (None, _encode, EXPLICIT, None, ""),
    "short": (lambda ds: setattr(ds, "PixelData", ds.PixelData[:-1024]), _encode, EXPLICIT,
              0xC000, "pixel data of 523264 bytes where"),
    "long": (lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\0" * 64), _encode, EXPLICIT,
             0xC000, "pixel data of 524352 bytes"),
    "empty": (lambda ds: setattr(ds, "PixelData", b""), _encode, EXPLICIT, 0xC000, "pixel data of 0 bytes"),
    "rows-columns-65535": (lambda ds: _size(ds, 65535, 65535), _encode, EXPLICIT, 0xC000,
                           "give 8589672450"),
    "odd-with-padding": (lambda ds: _small(ds, b"\x01" * 10), _encode, EXPLICIT, None, ""),
    "odd-too-long": (lambda ds: _small(ds, b"\x01" * 12), _encode, EXPLICIT, 0xC000, "give 9"),
    "no-rows": (lambda ds: delattr(ds, "Rows"), _encode, EXPLICIT, 0xA900, "without Rows"),
    "float-pixel-data": (_float, _encode, EXPLICIT, 0xA900, "float pixel data"),
    "implicit-short": (lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]),
                       lambda ds: _encode(ds, implicit=True), IMPLICIT, 0xC000, "pixel data of 1000"),
    "encapsulated-no-fragment": (None, lambda ds: _encapsulated(ds, b"\xfe\xff\x00\xe0\0\0\0\0"),
                                 JPEG_LS, 0xC000, "without a fragment"),
    "encapsulated-one-fragment": (None, lambda ds: _encapsulated(
        ds, b"\xfe\xff\x00\xe0\0\0\0\0\xfe\xff\x00\xe0\x04\0\0\0abcd"), JPEG_LS, None, ""),
    "trailing-garbage": (None, lambda ds: _encode(ds) + b"\x13\x37garbage", EXPLICIT, 0xC000,
                         "bytes after the pixel data"),
    "trailing-padding-element": (None, lambda ds: _encode(ds) + b"\xfc\xff\xfc\xffOB\0\0\x04\0\0\0\0\0\0\0",
                                 EXPLICIT, None, ""),
    "unclosed-sequence-after-pixels": (
        None, lambda ds: _encode(ds) + UNCLOSED_SEQUENCE, EXPLICIT, 0xC000, "bytes after the pixel data"),
    "flipped-item-tag": (None, lambda ds: _flip_item_tag(_encode(ds)), EXPLICIT, 0xC000,
                         "encoding is malformed"),
    "explicit-on-implicit-context": (None, _encode, IMPLICIT, 0xC000, "explicit VR on an Implicit"),
    "implicit-on-explicit-context": (None, lambda ds: _encode(ds, implicit=True), EXPLICIT, 0xC000,
                                     "implicit VR on an explicit"),
    "deflated": (None, lambda ds: _deflate(_encode(ds)), DEFLATED, None, ""),
    "deflated-short": (lambda ds: setattr(ds, "PixelData", ds.PixelData[:2048]),
                       lambda ds: _deflate(_encode(ds)), DEFLATED, 0xC000, "pixel data of 2048"),
    "deflated-cut": (None, lambda ds: _deflate(_encode(ds))[:-300], DEFLATED, 0xC000, "truncated"),
    "deflated-trailing-garbage": (None, lambda ds: _deflate(_encode(ds)) + b"garbage!", DEFLATED,
                                  0xC000, "after the end of the deflated"),
}


def _case(slice_ds: Dataset, name: str) -> tuple[Dataset, bytes, str]:
    edit, encode, syntax, _status, _reason = CASES[name]
    ds = copy.deepcopy(slice_ds)
    ds.SOPInstanceUID = generate_uid()
    if edit is not None:
        edit(ds)
    return ds, encode(ds), syntax


@pytest.mark.parametrize("name", list(CASES))
def test_pixel_data_and_encoding_checked_on_the_hot_path(slice_ds: Dataset, name: str,
                                                         tmp_path: Path) -> None:
    ds, body, syntax = _case(slice_ds, name)
    command = Command(1, 1, CT, str(ds.SOPInstanceUID), True)
    result = parse_header(file_prefix(command, syntax, "PEER") + body, syntax, spill_dir=tmp_path)
    status, reason = CASES[name][3], CASES[name][4]
    if status is None:
        assert isinstance(result, ParsedHeader), result
        assert result.has_pixel_data
    else:
        assert isinstance(result, Refusal) and result.status == status and reason in result.reason, result
    assert list(tmp_path.iterdir()) == []  # the inflated copy of a deflated data set is anonymous


def _write(path: Path, ds: Dataset, body: bytes, syntax: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID("1.2.3.4")
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    path.write_bytes(buffer.getvalue() + body)
    return path


def test_through_the_node_refused_with_status_and_acknowledged_readable(
        node: LungnodeProcess, slice_ds: Dataset, tmp_path: Path) -> None:
    names = ["sound", "short", "float-pixel-data", "trailing-garbage", "deflated",
             "deflated-short", "explicit-on-implicit-context", "odd-with-padding"]
    files = []
    for name in names:
        ds, body, syntax = _case(slice_ds, name)
        files.append(_write(tmp_path / f"{name}.dcm", ds, body, syntax))
    statuses = send_files(node.port, files)
    assert statuses == [CASES[n][3] or 0 for n in names]
    log = node.log()
    for name in names:
        if CASES[name][3] is not None:
            assert CASES[name][4] in log, name
    stored = stored_files(node.root)
    assert len(stored) == 3
    for path in stored:
        back = pydicom.dcmread(path)
        assert back.pixel_array.size > 0
        if shutil.which("dcmdump"):
            run = subprocess.run(["dcmdump", "-q", "+E", str(path)], capture_output=True)
            assert run.returncode == 0 and b"E: " not in run.stderr, run.stderr
    assert list((node.root / ".tmp").iterdir()) == []
