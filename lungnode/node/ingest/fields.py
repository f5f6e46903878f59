"""Header fields of a received instance: the column values of its patient, study, series and
instance rows, read from its header (never from pixel data).

One table (:data:`_COLUMNS`) says which element fills which column and how it is converted;
:func:`fields_from` applies it to any :class:`FieldValues` reader, so the receive path's in-place
reader and a pydicom data set (:func:`header_fields`) give the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.dataset import Dataset

from lungnode.provenance import PRIVATE_GROUP, is_own_output


class FieldValues(Protocol):
    """Read access to a header's top-level values by keyword, with pydicom's conversions.

    Implemented by :class:`_DatasetValues` (a pydicom data set) and by
    :class:`lungnode.node.ingest.header.RawHeader` (the receive path's in-place reader).
    """

    def text(self, keyword: str) -> str:
        """``str`` of the value, multiple values joined with a backslash; "" when absent."""

    def integer(self, keyword: str) -> int | None:
        """An IS/US value; None when absent or empty."""

    def number(self, keyword: str) -> float | None:
        """A DS value; None when absent or empty."""

    def has_group(self, group: int) -> bool:
        """Whether an element of ``group`` is present."""


class _DatasetValues:
    """:class:`FieldValues` of a pydicom data set."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def text(self, keyword: str) -> str:
        value = self.ds.get(keyword)
        if value is None:
            return ""
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return "\\".join(str(v) for v in value)
        return str(value)

    def integer(self, keyword: str) -> int | None:
        return _int(self.ds.get(keyword))

    def number(self, keyword: str) -> float | None:
        return _float(self.ds.get(keyword))

    def has_group(self, group: int) -> bool:
        return any((int(tag) >> 16) == group for tag in self.ds.keys())  # noqa: SIM118


def dataset_values(ds: Dataset) -> FieldValues:
    """The :class:`FieldValues` reader of a pydicom data set."""
    return _DatasetValues(ds)


def _float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _clean(text: str, limit: int) -> str:
    return text.replace("\x00", "").strip()[:limit]


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    return _clean(_DatasetValues(ds).text(keyword), limit)


def _group(ds: Dataset, keyword: str) -> Dataset | None:
    """First item of a functional group macro (shared, else first per-frame item)."""
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if seq:
            inner = seq[0].get(keyword)
            if inner:
                return inner[0]
    return None


@dataclass
class InstanceFields:
    """Everything stored about one instance, read from its header."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    own_output: bool = False


#: The columns read the same way from every header: (row, column, keyword, kind, length limit).
#: Kinds: ``text`` (cleaned, cut to the limit), ``uid`` (as read), ``int``, ``float``.
_COLUMNS: tuple[tuple[str, str, str, str, int], ...] = (
    ("patient", "patient_id", "PatientID", "text", 64),
    ("patient", "issuer", "IssuerOfPatientID", "text", 64),
    ("patient", "patient_name", "PatientName", "text", 324),
    ("patient", "birth_date", "PatientBirthDate", "text", 8),
    ("patient", "sex", "PatientSex", "text", 16),
    ("study", "study_uid", "StudyInstanceUID", "uid", 0),
    ("study", "study_date", "StudyDate", "text", 8),
    ("study", "study_time", "StudyTime", "text", 16),
    ("study", "accession_number", "AccessionNumber", "text", 16),
    ("study", "study_id", "StudyID", "text", 16),
    ("study", "description", "StudyDescription", "text", 64),
    ("study", "referring_physician", "ReferringPhysicianName", "text", 324),
    ("series", "series_uid", "SeriesInstanceUID", "uid", 0),
    ("series", "modality", "Modality", "text", 16),
    ("series", "series_number", "SeriesNumber", "int", 0),
    ("series", "description", "SeriesDescription", "text", 64),
    ("series", "body_part", "BodyPartExamined", "text", 16),
    ("series", "frame_of_reference_uid", "FrameOfReferenceUID", "text", 64),
    ("series", "manufacturer", "Manufacturer", "text", 64),
    ("instance", "sop_instance_uid", "SOPInstanceUID", "uid", 0),
    ("instance", "sop_class_uid", "SOPClassUID", "uid", 0),
    ("instance", "modality", "Modality", "text", 16),
    ("instance", "image_type", "ImageType", "text", 128),
    ("instance", "instance_number", "InstanceNumber", "int", 0),
    ("instance", "image_position", "ImagePositionPatient", "text", 128),
    ("instance", "image_orientation", "ImageOrientationPatient", "text", 256),
    ("instance", "pixel_spacing", "PixelSpacing", "text", 64),
    ("instance", "slice_thickness", "SliceThickness", "float", 0),
    ("instance", "spacing_between_slices", "SpacingBetweenSlices", "float", 0),
    ("instance", "rows", "Rows", "int", 0),
    ("instance", "columns", "Columns", "int", 0),
    ("instance", "number_of_frames", "NumberOfFrames", "int", 0),
    ("instance", "images_in_acquisition", "ImagesInAcquisition", "int", 0),
    ("instance", "acquisition_number", "AcquisitionNumber", "int", 0),
    ("instance", "gantry_tilt", "GantryDetectorTilt", "float", 0),
    ("instance", "kernel", "ConvolutionKernel", "text", 64),
)


def fields_from(values: FieldValues) -> InstanceFields:
    """The row values of a header's top-level elements (no functional groups, no provenance).

    Parameters
    ----------
    values:
        The header's values (a pydicom data set through :func:`header_fields`, or the receive
        path's :class:`~lungnode.node.ingest.header.RawHeader`); any exception it raises propagates.

    Returns
    -------
    InstanceFields
        Column values for the patient, study, series and instance rows; ``own_output`` False.
    """
    rows: dict[str, dict[str, Any]] = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    for row, column, keyword, kind, limit in _COLUMNS:
        if kind == "text":
            value: Any = _clean(values.text(keyword), limit)
        elif kind == "uid":
            value = values.text(keyword)
        elif kind == "int":
            value = values.integer(keyword)
        else:
            value = values.number(keyword)
        rows[row][column] = value
    rows["instance"]["number_of_frames"] = rows["instance"]["number_of_frames"] or 1
    return InstanceFields(patient=rows["patient"], study=rows["study"], series=rows["series"],
                          instance=rows["instance"])


def header_fields(ds: Dataset) -> InstanceFields:
    """Read the fields later stages need from a pydicom header.

    Parameters
    ----------
    ds:
        A header read with ``stop_before_pixels=True``.

    Returns
    -------
    InstanceFields
        Column values for the patient, study, series and instance rows: the top-level elements
        (:func:`fields_from`), completed from the functional groups of multi-frame objects, and
        whether the object is one of ours (:func:`lungnode.provenance.is_own_output`).
    """
    values = _DatasetValues(ds)
    fields = fields_from(values)
    instance = fields.instance
    if not instance["image_orientation"] and \
            (plane := _group(ds, "PlaneOrientationSequence")) is not None:
        instance["image_orientation"] = _text(plane, "ImageOrientationPatient", 256)
    if not instance["image_position"]:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and per_frame[0].get("PlanePositionSequence"):
            instance["image_position"] = _text(per_frame[0].PlanePositionSequence[0],
                                               "ImagePositionPatient", 128)
    if (measures := _group(ds, "PixelMeasuresSequence")) is not None:
        instance["pixel_spacing"] = instance["pixel_spacing"] or _text(measures, "PixelSpacing", 64)
        if instance["slice_thickness"] is None:
            instance["slice_thickness"] = _float(measures.get("SliceThickness"))
    if not instance["kernel"] and (recon := _group(ds, "CTReconstructionSequence")) is not None:
        instance["kernel"] = _text(recon, "ConvolutionKernel", 64)
    # is_own_output probes 240 private tags; only do it when group 0071 is present at all.
    fields.own_output = values.has_group(PRIVATE_GROUP) and is_own_output(ds)
    return fields


def split_numbers(text: str) -> list[float] | None:
    """The numbers of a multi-valued text column (``"a\\b\\c"``, e.g. ``image_position``).

    Returns ``None`` when the text is empty or a value is not a number.
    """
    try:
        values = [float(v) for v in text.split("\\") if v.strip() != ""]
    except ValueError:
        return None
    return values or None
