"""What the listener accepts: SOP classes, transfer syntaxes, callers, and per-instance checks.

This module owns the node's conformance on the receiving side (the conformance-statement test
reads :data:`SCP_SOP_CLASSES` and :data:`SCP_TRANSFER_SYNTAXES`) and the decisions that turn a
received C-STORE into a success or a failure status with a logged reason. It does no I/O.

SOP classes
-----------
A PACS routes whole studies (or rule-selected series) to an AI node. Besides the CT images the
node analyses, a CT study commonly carries dose reports (X-Ray Radiation Dose SR, Secondary
Capture dose screens, Encapsulated PDF), key object selections and presentation states, the PET
half of a PET/CT, raw data objects, and our own results (SEG, Comprehensive/Enhanced SR, burned-in
Secondary Capture) routed back. Those are *stored but ignored* (the selection rules exclude them)
instead of being refused, because a refusal makes the PACS retry and raise alarms for a study
that is fine. MR, US, XA, NM, MG and other modalities are refused at association negotiation:
a PACS sending them to a CT node is misrouted, and the sender sees that at once.

Transfer syntaxes
-----------------
Every non-video syntax a CT scanner or PACS may use. The node keeps the bytes as sent and never
decodes pixel data on receipt, so accepting a syntax costs nothing; decoding happens later in
the inference reader, which reports undecodable series as a permanent job failure.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import dcmread

from lungnode.node.ingest.fields import InstanceFields, fields_from, header_fields
from lungnode.node.ingest.header import UnsureError, scan_header
from lungnode.provenance import PRIVATE_GROUP
from lungnode.uids import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    is_valid_uid,
)

#: Storage SOP classes accepted as SCP (abstract syntax UID → name).
SCP_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data Storage",
}

#: Transfer syntaxes accepted for every SOP class above (UID → name).
SCP_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.98": "Encapsulated Uncompressed Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian (retired)",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 (Lossless Only)",
    "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 with RPCL Options (Lossless Only)",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
}

#: Image SOP classes whose IOD requires pixel data (type 1).
PIXEL_SOP_CLASSES: frozenset[str] = frozenset(
    uid for uid, name in SCP_SOP_CLASSES.items()
    if "Image Storage" in name or "Segmentation" in name
)

#: Transfer syntaxes with native (not encapsulated) pixel data.
_NATIVE = {IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE}

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_PROCESSING_FAILURE = 0x0110

_PIXEL_TAGS_LE = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
_PIXEL_TAGS_BE = (b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09")


@dataclass(frozen=True)
class Refusal:
    """Why an instance is refused: the C-STORE failure status and a reason (logged and audited)."""

    status: int
    reason: str


@dataclass(frozen=True)
class ParsedHeader:
    """A received instance's header, parsed without pixel data."""

    #: The row values read from the header (UIDs not validated yet: see :func:`check_instance`).
    fields: InstanceFields
    #: Whether a pixel data element follows the header in the received bytes.
    has_pixel_data: bool


def parse_header(data: bytes | mmap.mmap, transfer_syntax: str) -> ParsedHeader | Refusal:
    """Parse the header of a received instance (preamble + meta + dataset) without pixel data.

    The in-place reader (:func:`lungnode.node.ingest.header.scan_header`) reads the fields of most
    headers; pydicom reads the rest (big endian, deflate, functional groups, our own outputs'
    private block, character sets or values the reader is not sure of) with the same result.

    Parameters
    ----------
    data:
        The received file: preamble, file meta and the data set bytes as sent (in memory, or a
        read-only mapping of the temp file for large instances).
    transfer_syntax:
        The presentation context's transfer syntax UID.

    Returns
    -------
    ParsedHeader or Refusal
        The header, or a 0xC000 refusal when it cannot be read.
    """
    tags = _PIXEL_TAGS_BE if transfer_syntax == EXPLICIT_VR_BE else _PIXEL_TAGS_LE
    fields: InstanceFields | None = None
    ds: Dataset | None = None
    raw = scan_header(data, transfer_syntax)
    if raw is not None:
        pos = raw.pixel_offset
        has_pixels = pos >= 0
        if not raw.has_group(PRIVATE_GROUP):
            with contextlib.suppress(UnsureError):
                fields = fields_from(raw)
        if fields is None:
            ds = raw.dataset()
    else:
        stream: BinaryIO = data if isinstance(data, mmap.mmap) else io.BytesIO(data)  # type: ignore[assignment]
        stream.seek(0)
        try:
            ds = dcmread(stream, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on malformed input
            return Refusal(STATUS_CANNOT_UNDERSTAND, f"unreadable header: {type(exc).__name__}")
        if len(ds) == 0:
            return Refusal(STATUS_CANNOT_UNDERSTAND, "empty data set")
        pos = stream.tell()
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
            # The stream position is inside the inflated copy; look for pixel data the slow way.
            has_pixels = any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)) or \
                _deflated_has_pixels(data)
        else:
            has_pixels = pos < len(data) and data[pos:pos + 4] in tags
    if has_pixels and transfer_syntax != DEFLATED_EXPLICIT_VR_LE:
        if transfer_syntax in _NATIVE:
            problem = check_native(data, pos, transfer_syntax)
        elif data[pos:pos + 4] == tags[0]:
            problem = check_encapsulated(data, pos)
        else:
            problem = ""
        if problem:
            return Refusal(STATUS_CANNOT_UNDERSTAND, problem)
    if fields is None:
        assert ds is not None
        try:
            fields = header_fields(ds)
        except Exception as exc:  # a value pydicom cannot convert
            return Refusal(STATUS_CANNOT_UNDERSTAND, f"unreadable header value: {type(exc).__name__}")
    return ParsedHeader(fields, has_pixels)


def check_native(data: bytes | mmap.mmap, pos: int, transfer_syntax: str) -> str:
    """Check that native pixel data starting at ``pos`` is as long as its element says.

    Returns
    -------
    str
        Empty when complete, else what is wrong.
    """
    if transfer_syntax == IMPLICIT_VR_LE:  # implicit VR: tag(4) length(4)
        header, fmt = 8, "<I"
        offset = pos + 4
    else:  # explicit VR OB/OW/OF/OD: tag(4) VR(2) reserved(2) length(4)
        header, fmt = 12, ">I" if transfer_syntax == EXPLICIT_VR_BE else "<I"
        offset = pos + 8
    if len(data) < pos + header:
        return "pixel data element truncated"
    (length,) = struct.unpack_from(fmt, data, offset)
    if length == 0xFFFFFFFF:
        return "native pixel data with undefined length"
    if pos + header + length > len(data):
        return f"pixel data truncated ({len(data) - pos - header} of {length} bytes)"
    return ""


def _deflated_has_pixels(data: bytes | mmap.mmap) -> bool:
    try:
        ds = dcmread(io.BytesIO(data[:]), defer_size=256)
    except Exception:
        return False
    return any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009))


def check_encapsulated(data: bytes | mmap.mmap, pos: int) -> str:
    """Walk the items of encapsulated pixel data starting at ``pos`` (no decoding).

    Returns
    -------
    str
        Empty when the fragment sequence is complete, else what is wrong (truncated data).
    """
    # Explicit VR OB element header: tag(4) 'OB'(2) reserved(2) length(4) = 0xFFFFFFFF.
    if len(data) < pos + 12:
        return "pixel data element truncated"
    (length,) = struct.unpack_from("<I", data, pos + 8)
    if length != 0xFFFFFFFF:
        return "encapsulated pixel data without undefined length"
    offset = pos + 12
    end = len(data)
    while offset + 8 <= end:
        tag = data[offset:offset + 4]
        (item_len,) = struct.unpack_from("<I", data, offset + 4)
        if tag == b"\xfe\xff\xdd\xe0":
            return ""
        if tag != b"\xfe\xff\x00\xe0":
            return "encapsulated pixel data: unexpected tag between fragments"
        offset += 8 + item_len
        if offset > end:
            return "encapsulated pixel data truncated inside a fragment"
    return "encapsulated pixel data truncated (no sequence delimiter)"


def check_instance(header: ParsedHeader, affected_sop_class: str,
                   affected_sop_instance: str) -> Refusal | None:
    """Check a parsed instance against its C-STORE request before any of it becomes a path or a row.

    Parameters
    ----------
    header:
        The parsed header.
    affected_sop_class, affected_sop_instance:
        The request's Affected SOP Class / Instance UID.

    Returns
    -------
    Refusal or None
        A 0xA900 refusal (the data set does not match its SOP class: bad or empty UIDs, a
        different SOP class or instance, image without pixel data), or ``None`` when acceptable.
    """
    f = header.fields
    uids = (("SOPClassUID", f.instance["sop_class_uid"]), ("SOPInstanceUID", f.instance["sop_instance_uid"]),
            ("StudyInstanceUID", f.study["study_uid"]), ("SeriesInstanceUID", f.series["series_uid"]))
    for keyword, value in uids:
        if not is_valid_uid(value):
            what = "empty" if not value else "not a valid UID"
            return Refusal(STATUS_DOES_NOT_MATCH, f"{keyword} is {what}")
    if f.instance["sop_class_uid"] != affected_sop_class:
        return Refusal(STATUS_DOES_NOT_MATCH, "SOPClassUID differs from the affected SOP class")
    if f.instance["sop_instance_uid"] != affected_sop_instance:
        return Refusal(STATUS_DOES_NOT_MATCH, "SOPInstanceUID differs from the affected instance")
    if affected_sop_class in PIXEL_SOP_CLASSES and not header.has_pixel_data:
        return Refusal(STATUS_DOES_NOT_MATCH, "image without pixel data")
    return None
