"""What the listener accepts: SOP classes, transfer syntaxes, callers, and per-instance checks.

This module owns the node's conformance on the receiving side (the conformance-statement test
reads :data:`SCP_SOP_CLASSES` and :data:`SCP_TRANSFER_SYNTAXES`) and the decisions that turn a
received C-STORE into a success or a failure status with a logged reason. It does no I/O (but for
inflating a deflated data set into an anonymous temp file, :func:`lungnode.node.ingest.inflate.inflate`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import dcmread

from lungnode.node.ingest import payload
from lungnode.node.ingest.fields import InstanceFields, dataset_values, fields_from, header_fields
from lungnode.node.ingest.header import RawHeader, UnsureError, scan_header
from lungnode.node.ingest.inflate import inflate
from lungnode.provenance import PRIVATE_GROUP
from lungnode.uids import EXPLICIT_VR_BE, is_valid_uid

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

#: Default of ``[storage] max_dataset_mb`` in bytes (how far a deflated data set may inflate).
DEFAULT_MAX_DATASET_BYTES = 2048 << 20

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


def parse_header(data: bytes | mmap.mmap, transfer_syntax: str, *,
                 max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
                 spill_dir: Path | None = None) -> ParsedHeader | Refusal:
    """Parse the header of a received instance (preamble + meta + dataset) and check the rest.

    The in-place reader (:func:`lungnode.node.ingest.header.scan_header`) reads the fields of most
    headers; pydicom reads the rest (big endian, functional groups, our own outputs' private
    block, character sets or values the reader is not sure of) with the same result. Then the
    encoding, the pixel data element and what follows it are checked without decoding pixels
    (:mod:`lungnode.node.ingest.payload`). A deflated data set is inflated in bounded steps into
    an anonymous temp file first and checked as explicit VR little endian.

    Parameters
    ----------
    data:
        The received file: preamble, file meta and the data set bytes as sent (in memory, or a
        read-only mapping of the temp file for large instances).
    transfer_syntax:
        The presentation context's transfer syntax UID.
    max_dataset_bytes:
        Most bytes a deflated data set may inflate to.
    spill_dir:
        Folder of the anonymous temp file a deflated data set is inflated into.

    Returns
    -------
    ParsedHeader or Refusal
        The header, or a refusal: 0xC000 when it cannot be read or its pixel data or trailing
        bytes are not sound, 0xA900 when the pixel data does not fit the image IOD, 0xA700 when
        a deflated data set inflates beyond ``max_dataset_bytes``.
    """
    if transfer_syntax == payload.DEFLATED:
        inflated = inflate(data, max_dataset_bytes, spill_dir)
        if isinstance(inflated, str):
            status = STATUS_OUT_OF_RESOURCES if "limit" in inflated else STATUS_CANNOT_UNDERSTAND
            return Refusal(status, inflated)
        with inflated:
            return parse_header(inflated.data, payload.EXPLICIT_VR_LE)
    problem = payload.check_encoding(data, transfer_syntax)
    if problem:
        return Refusal(STATUS_CANNOT_UNDERSTAND, problem)
    tags = _PIXEL_TAGS_BE if transfer_syntax == EXPLICIT_VR_BE else _PIXEL_TAGS_LE
    fields: InstanceFields | None = None
    ds: Dataset | None = None
    raw = scan_header(data, transfer_syntax)
    # The strict walk (what DCMTK refuses): on what the scan read, only what it did not check.
    problem = payload.check_scanned(raw) if raw is not None else \
        payload.check_structure(data, transfer_syntax)
    if problem:
        return Refusal(STATUS_CANNOT_UNDERSTAND, problem)
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
        has_pixels = pos < len(data) and data[pos:pos + 4] in tags
        if not has_pixels and pos < len(data):  # pydicom stopped before the end, not at pixels
            return Refusal(STATUS_CANNOT_UNDERSTAND, "data set not readable to its end")
    if has_pixels:
        iod_problem, problem = payload.check_pixel_data(data, pos, transfer_syntax,
                                                        _image_size(raw, ds))
        if problem:
            return Refusal(STATUS_DOES_NOT_MATCH if iod_problem else STATUS_CANNOT_UNDERSTAND,
                           problem)
    if fields is None:
        assert ds is not None
        try:
            fields = header_fields(ds)
        except Exception as exc:  # a value pydicom cannot convert
            return Refusal(STATUS_CANNOT_UNDERSTAND, f"unreadable header value: {type(exc).__name__}")
    return ParsedHeader(fields, has_pixels)


_SIZE_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames")


def _image_size(raw: RawHeader | None, ds: Dataset | None) -> payload.ImageSize:
    """The values giving the length of native pixel data, read in place or from pydicom's data set."""
    if raw is not None:
        try:
            return payload.ImageSize(*(raw.integer(keyword) for keyword in _SIZE_KEYWORDS))
        except UnsureError:
            ds = ds if ds is not None else raw.dataset()
    assert ds is not None
    values = dataset_values(ds)
    return payload.ImageSize(*(values.integer(keyword) for keyword in _SIZE_KEYWORDS))


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
