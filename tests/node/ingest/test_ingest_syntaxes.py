"""Transfer-syntax matrix: the shared single files, and DCMTK-compressed copies of the chest series.

Byte identity: the raw sender (:func:`tests.node_process.send_files`) sends each file's own data set
bytes, so the stored data set must be identical byte for byte. ``storescu`` re-encodes the data set
from its parsed form (e.g. undefined-length sequences get explicit lengths), so what it sends can
differ from the file; for DCMTK-written files it does not, and the test asserts identity too.
"""

from __future__ import annotations

import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.node.ingest.conftest import instance_rows, sop_uid, storescu
from tests.node_process import LungnodeProcess, dataset_bytes, send_files

# Shared files → expected C-STORE status (None: the SOP class is not accepted at negotiation).
SHARED_EXPECTED: dict[str, int | None] = {
    "693_UNCR.dcm": 0x0000,            # CT, explicit VR
    "693_J2KR.dcm": 0x0000,            # CT, JPEG 2000 lossless; same SOP Instance UID as UNCR: version 2
    "693_UNCI.dcm": 0x0000,            # CT, explicit VR
    "JPEG-LL.dcm": 0x0000,             # Secondary Capture, JPEG lossless SV1
    "JPEG2000_UNC.dcm": 0x0000,        # Secondary Capture, explicit VR
    "eCT_Supplemental.dcm": 0x0000,    # Enhanced CT, multi-frame
    "explicit_VR-UN.dcm": 0x0000,      # CT, JPEG 2000, elements with VR UN
    "liver_deflate.dcm": 0x0000,       # SEG, Deflated Image Frame Compression
    "liver_rle.dcm": 0x0000,           # SEG, RLE lossless
    "JLSL_16_15_1_1F.dcm": 0xA900,     # JPEG-LS, but StudyInstanceUID is empty
    "bad_sequence.dcm": 0xA900,        # SOPInstanceUID is a hex digest, not a UID
    "JPGLosslessP14SV1_1s_1f_8b.dcm": None,   # Ultrasound: not a CT node's SOP class
    "emri_small.dcm": None,                    # Enhanced MR (all emri_*: refused at negotiation)
    "emri_small_big_endian.dcm": None,
    "emri_small_RLE.dcm": None,
    "emri_small_jpeg_2k_lossless.dcm": None,
    "emri_small_jpeg_ls_lossless.dcm": None,
    "emri_small_jpeg_2k_lossless_too_short.dcm": None,
}

# DCMTK conversions of chest slices: (name, command builder, expected transfer syntax, storescu
# option proposing that syntax; None: storescu cannot propose it, raw sender only).
CONVERSIONS: list[tuple[str, Callable[[Path, Path], list[str]], str, str | None]] = [
    ("jpeg-lossless-sv1", lambda s, d: ["dcmcjpeg", str(s), str(d)], "1.2.840.10008.1.2.4.70", "-xs"),
    ("jpeg-lossless-p14", lambda s, d: ["dcmcjpeg", "+el", str(s), str(d)], "1.2.840.10008.1.2.4.57", None),
    ("jpeg-ls-lossless", lambda s, d: ["dcmcjpls", str(s), str(d)], "1.2.840.10008.1.2.4.80", "-xt"),
    ("jpeg-ls-near", lambda s, d: ["dcmcjpls", "+en", str(s), str(d)], "1.2.840.10008.1.2.4.81", "-xu"),
    ("rle", lambda s, d: ["dcmcrle", str(s), str(d)], "1.2.840.10008.1.2.5", "-xr"),
    ("deflate", lambda s, d: ["dcmconv", "+td", str(s), str(d)], "1.2.840.10008.1.2.1.99", "-xd"),
    ("big-endian", lambda s, d: ["dcmconv", "+tb", str(s), str(d)], "1.2.840.10008.1.2.2", "-xb"),
    ("implicit", lambda s, d: ["dcmconv", "+ti", str(s), str(d)], "1.2.840.10008.1.2", "-xi"),
]


@pytest.mark.parametrize("name", sorted(SHARED_EXPECTED, key=lambda n: (n != "693_UNCR.dcm", n)))
def test_shared_transfer_syntax_files(node: LungnodeProcess, shared_data: Path, name: str) -> None:
    path = shared_data / "transfer-syntaxes" / name
    expected = SHARED_EXPECTED[name]
    if expected is None:
        with pytest.raises(ConnectionError):
            send_files(node.port, [path])
        return
    assert send_files(node.port, [path]) == [expected]
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    rows = instance_rows(node, sop_instance_uid=str(meta.MediaStorageSOPInstanceUID))
    if expected != 0:
        assert rows == [] and "C-STORE refused with 0xA900" in node.log()
        return
    row = max(rows, key=lambda r: r.version)
    assert row.transfer_syntax_uid == str(meta.TransferSyntaxUID)
    assert dataset_bytes(node.root / row.path) == dataset_bytes(path)
    if name == "693_J2KR.dcm":  # same SOP Instance UID as 693_UNCR.dcm (sent first), other bytes
        assert [r.version for r in sorted(rows, key=lambda r: r.version)] == [1, 2]
        assert row.path.endswith(".v2.dcm") and row.current
        assert not next(r for r in rows if r.version == 1).current


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, chest_ct_dir: Path) -> dict[str, list[Path]]:
    """Two chest slices per DCMTK conversion (one for each sender), distinct SOP instances."""
    out = tmp_path_factory.mktemp("converted")
    slices = sorted(chest_ct_dir.glob("*.dcm"))
    result: dict[str, list[Path]] = {}
    for i, (name, command, ts, _option) in enumerate(CONVERSIONS):
        pair = []
        for j, src in enumerate((slices[i], slices[i + 15])):
            dst = out / f"{name}-{j}.dcm"
            subprocess.run(command(src, dst), check=True, capture_output=True)
            assert str(pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
            pair.append(dst)
        result[name] = pair
    return result


@pytest.mark.parametrize("name", [c[0] for c in CONVERSIONS])
def test_dcmtk_compressed_copies_arrive_identical(node: LungnodeProcess, converted: dict[str, list[Path]],
                                                  dcmtk_env: dict[str, str], name: str) -> None:
    raw_file, dcmtk_file = converted[name]
    assert send_files(node.port, [raw_file]) == [0]
    sent = [raw_file]
    option = next(c[3] for c in CONVERSIONS if c[0] == name)
    if option is not None:
        result = storescu(node.port, [dcmtk_file], dcmtk_env, extra=[option])
        assert result.returncode == 0, result.stderr
        sent.append(dcmtk_file)
    for path in sent:
        (row,) = instance_rows(node, sop_instance_uid=sop_uid(path))
        stored = node.root / row.path
        expected_ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert row.transfer_syntax_uid == expected_ts
        if name == "deflate" and path == dcmtk_file:
            # storescu deflates again on the wire (and pads the stream to even length): the
            # inflated data set is what must be identical.
            assert _inflate(dataset_bytes(stored)) == _inflate(dataset_bytes(path))
        else:
            assert dataset_bytes(stored) == dataset_bytes(path), f"{name}: {path.name} differs"


def _inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
