"""What every output shares: provenance, series numbers, source headers, encoding to bytes.

Owns
----
* :class:`SourceSeries`: the source CT headers (no pixel data) sorted like the masks' axis 0.
* :class:`OutputContext`: who made the output (manufacturer, model, software version, job).
* :func:`finish_output`: Manufacturer/model/software version, Contributing Equipment, our private
  block (:func:`lungnode.provenance.add_provenance`) and the patient/study attributes copied
  from the source, on every SEG, SR and SC. This is what loop protection recognises.
* :func:`encode`: a dataset as Part 10 bytes (what is stored and sent, never re-encoded).

Series numbers: SEG ``base + 0``, SR ``base + 1``, SC ``base + 2``, summary page ``base + 3``,
its PDF ``base + 4`` (``[results] series_number_base``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lungnode import __version__
from lungnode.inference.types import ModelInfo
from lungnode.provenance import add_provenance

#: Offsets of each kind's series number from ``[results] series_number_base``.
SERIES_OFFSETS = {"seg": 0, "sr": 1, "sc": 2, "summary": 3, "pdf": 4}
#: What ``[results] label_not_for_clinical_use`` puts in front of every SeriesDescription.
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
#: Manufacturer's model name written into every output.
MODEL_NAME = "lungnode COVID-19 lung CT"

#: Patient, study and general-study attributes copied verbatim from the source.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "OtherPatientIDsSequence", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyDescription", "ReferringPhysicianName", "IssuerOfAccessionNumberSequence",
)


@dataclass(frozen=True)
class SourceSeries:
    """The source series' headers, one per slice of the masks (axis 0 order).

    Attributes
    ----------
    datasets:
        One header per slice (pixel data not read), sorted like the masks.
    series_uid, study_uid, frame_of_reference_uid:
        The source's UIDs.
    """

    datasets: tuple[Dataset, ...]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str

    @classmethod
    def from_files(cls, files: Sequence[Path]) -> SourceSeries:
        """Read the headers of ``files`` (already sorted like the masks).

        Parameters
        ----------
        files:
            ``SeriesVolume.source_files`` (single-frame CT slices).

        Returns
        -------
        SourceSeries
        """
        cache: dict[Path, Dataset] = {}
        datasets = []
        for f in files:
            path = Path(f)
            if path not in cache:
                cache[path] = pydicom.dcmread(path, stop_before_pixels=True)
            datasets.append(cache[path])
        first = datasets[0]
        return cls(tuple(datasets), str(first.SeriesInstanceUID), str(first.StudyInstanceUID),
                   str(first.get("FrameOfReferenceUID", "")))

    @property
    def first(self) -> Dataset:
        """The header of the first slice (patient and study attributes come from here)."""
        return self.datasets[0]


@dataclass(frozen=True)
class OutputContext:
    """Who and what produced an output.

    Attributes
    ----------
    job_id:
        Job primary key (0 for the offline ``infer`` command).
    model:
        The model (name, version: algorithm identification).
    manufacturer:
        ``[results] manufacturer``.
    series_number_base:
        ``[results] series_number_base``.
    device_uid:
        Stable UID of this node as an SR device observer.
    station_ae:
        Our AE title (device observer name).
    label:
        Put at the start of every SeriesDescription (``NOT FOR CLINICAL USE`` when
        ``[results] label_not_for_clinical_use``); empty: none.
    """

    job_id: int
    model: ModelInfo
    manufacturer: str = "lungnode"
    series_number_base: int = 9100
    device_uid: str = ""
    station_ae: str = "LUNGNODE"
    label: str = ""

    @property
    def software_version(self) -> str:
        """lungnode's version (``SoftwareVersions``)."""
        return __version__

    @property
    def model_label(self) -> str:
        """``"name version"`` of the model."""
        return f"{self.model.name} {self.model.version}"

    def series_number(self, kind: str) -> int:
        """Series number of an output kind (``seg``, ``sr``, ``sc``)."""
        return self.series_number_base + SERIES_OFFSETS[kind]

    def observer_uid(self) -> str:
        """The device observer UID (given, or derived from the AE title: stable across runs)."""
        return self.device_uid or str(generate_uid(entropy_srcs=["lungnode-device", self.station_ae]))


def new_uid() -> str:
    """A fresh UID (for a series or SOP instance)."""
    return str(generate_uid())


def contributing_equipment(ctx: OutputContext) -> hd.ContributingEquipment:
    """Contributing Equipment item naming lungnode and the model as the processing algorithm."""
    return hd.ContributingEquipment(
        manufacturer=ctx.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MODEL_NAME,
        software_versions=(ctx.software_version, ctx.model_label[:64]),
        contribution_description=f"Lung and infiltrate segmentation, model {ctx.model_label}"[:64],
    )


def algorithm_identification(ctx: OutputContext) -> hd.AlgorithmIdentificationSequence:
    """SEG Segment Algorithm Identification: model name and version from the checkpoint."""
    return hd.AlgorithmIdentificationSequence(
        name=ctx.model.name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=ctx.model.version[:64],
        source=ctx.manufacturer[:64],
    )


def finish_output(ds: Dataset, source: SourceSeries, ctx: OutputContext, *,
                  series_description: str) -> Dataset:
    """Put provenance and the source's patient/study attributes on an output.

    Parameters
    ----------
    ds:
        The output dataset (modified in place).
    source:
        The source series.
    ctx:
        Producer identity.
    series_description:
        SeriesDescription of the output series.

    Returns
    -------
    Dataset
        ``ds`` itself.
    """
    first = source.first
    if "SpecificCharacterSet" in first:  # names copied below are encoded in the source's set
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in first and first[keyword].value not in (None, ""):
            ds[keyword] = first[keyword]
        elif keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                         "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                         "ReferringPhysicianName"):
            setattr(ds, keyword, "")
    ds.Manufacturer = ctx.manufacturer[:64]
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = [ctx.software_version, ctx.model_label[:64]]
    if ctx.label:
        series_description = f"{ctx.label} {series_description}"
    ds.SeriesDescription = series_description[:64]
    equipment = list(ds.get("ContributingEquipmentSequence", []))
    if not any(str(e.get("Manufacturer", "")) == ctx.manufacturer[:64]
               and e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102" for e in equipment):
        ds.ContributingEquipmentSequence = [*equipment, contributing_equipment(ctx)]
    add_provenance(ds, job_id=ctx.job_id, model=ctx.model_label, source_series_uid=source.series_uid)
    return ds


def encode(ds: Dataset) -> bytes:
    """Encode ``ds`` as a Part 10 file (preamble, file meta, dataset) in its transfer syntax."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
