"""Header fields of a received instance: the column values of its patient, study, series and
instance rows, read from a pydicom header (never from pixel data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from lungnode.provenance import PRIVATE_GROUP, is_own_output


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        out = "\\".join(str(v) for v in value)
    else:
        out = str(value)
    return out.replace("\x00", "").strip()[:limit]


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


def header_fields(ds: Dataset) -> InstanceFields:
    """Read the fields later stages need from a header (UIDs must already be valid).

    Parameters
    ----------
    ds:
        A header read with ``stop_before_pixels=True``.

    Returns
    -------
    InstanceFields
        Column values for the patient, study, series and instance rows.
    """
    orientation = _text(ds, "ImageOrientationPatient", 256)
    position = _text(ds, "ImagePositionPatient", 128)
    spacing = _text(ds, "PixelSpacing", 64)
    thickness = _float(ds.get("SliceThickness"))
    if not orientation and (plane := _group(ds, "PlaneOrientationSequence")) is not None:
        orientation = _text(plane, "ImageOrientationPatient", 256)
    if not position:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and per_frame[0].get("PlanePositionSequence"):
            position = _text(per_frame[0].PlanePositionSequence[0], "ImagePositionPatient", 128)
    if (measures := _group(ds, "PixelMeasuresSequence")) is not None:
        spacing = spacing or _text(measures, "PixelSpacing", 64)
        thickness = thickness if thickness is not None else _float(measures.get("SliceThickness"))
    kernel = _text(ds, "ConvolutionKernel", 64)
    if not kernel and (recon := _group(ds, "CTReconstructionSequence")) is not None:
        kernel = _text(recon, "ConvolutionKernel", 64)
    modality = _text(ds, "Modality", 16)
    return InstanceFields(
        patient={"patient_id": _text(ds, "PatientID", 64),
                 "issuer": _text(ds, "IssuerOfPatientID", 64),
                 "patient_name": _text(ds, "PatientName", 324),
                 "birth_date": _text(ds, "PatientBirthDate", 8),
                 "sex": _text(ds, "PatientSex", 16)},
        study={"study_uid": str(ds.StudyInstanceUID),
               "study_date": _text(ds, "StudyDate", 8),
               "study_time": _text(ds, "StudyTime", 16),
               "accession_number": _text(ds, "AccessionNumber", 16),
               "study_id": _text(ds, "StudyID", 16),
               "description": _text(ds, "StudyDescription", 64),
               "referring_physician": _text(ds, "ReferringPhysicianName", 324)},
        series={"series_uid": str(ds.SeriesInstanceUID),
                "modality": modality,
                "series_number": _int(ds.get("SeriesNumber")),
                "description": _text(ds, "SeriesDescription", 64),
                "body_part": _text(ds, "BodyPartExamined", 16),
                "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID", 64),
                "manufacturer": _text(ds, "Manufacturer", 64)},
        instance={"sop_instance_uid": str(ds.SOPInstanceUID),
                  "sop_class_uid": str(ds.SOPClassUID),
                  "modality": modality,
                  "image_type": _text(ds, "ImageType", 128),
                  "instance_number": _int(ds.get("InstanceNumber")),
                  "image_position": position,
                  "image_orientation": orientation,
                  "pixel_spacing": spacing,
                  "slice_thickness": thickness,
                  "spacing_between_slices": _float(ds.get("SpacingBetweenSlices")),
                  "rows": _int(ds.get("Rows")),
                  "columns": _int(ds.get("Columns")),
                  "number_of_frames": _int(ds.get("NumberOfFrames")) or 1,
                  "images_in_acquisition": _int(ds.get("ImagesInAcquisition")),
                  "acquisition_number": _int(ds.get("AcquisitionNumber")),
                  "gantry_tilt": _float(ds.get("GantryDetectorTilt")),
                  "kernel": kernel},
        # is_own_output probes 240 private tags; only do it when group 0071 is present at all.
        own_output=any((int(tag) >> 16) == PRIVATE_GROUP for tag in ds.keys())  # noqa: SIM118
        and is_own_output(ds),
    )
