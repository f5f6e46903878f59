"""The summary page as DICOM: a Secondary Capture image and, on request, an Encapsulated PDF.

* ``summary``: one RGB Secondary Capture (SOP Class 1.2.840.10008.5.1.4.1.1.7) holding the page
  of :mod:`.summary_page`, series number ``base + 3``, BurnedInAnnotation YES, "NOT FOR PRIMARY
  DIAGNOSIS" in ImageComments; for PACS that show neither SEG nor SR.
* ``pdf``: the same page as an Encapsulated PDF (SOP Class 1.2.840.10008.5.1.4.1.1.104.1,
  Modality DOC), series number ``base + 4``.

Both reference the source series (Source Image Sequence / Source Instance Sequence: the key
slices shown) and carry the usual provenance (:func:`~.common.finish_output`).
"""

from __future__ import annotations

import datetime as dt
import io

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from lungnode.inference.comparison import Comparison
from lungnode.inference.severity import SeverityReport
from lungnode.inference.types import InferenceResult
from lungnode.node.results.common import OutputContext, SourceSeries, finish_output, new_uid
from lungnode.node.results.sc import NOT_FOR_DIAGNOSIS
from lungnode.node.results.summary_page import PageText, key_slices, render_summary
from lungnode.uids import ENCAPSULATED_PDF_STORAGE

__all__ = ["ENCAPSULATED_PDF", "build_pdf", "build_summary_sc", "page_text", "render_page"]

ENCAPSULATED_PDF = UID(ENCAPSULATED_PDF_STORAGE)
DOCUMENT_TITLE = "AI lung CT report (pneumonia extent)"


def page_text(source: SourceSeries, ctx: OutputContext) -> PageText:
    """Patient, study and producer text of the page from the source headers."""
    first = source.first
    return PageText(patient_name=str(first.get("PatientName", "")),
                    patient_id=str(first.get("PatientID", "")),
                    study_date=str(first.get("StudyDate", "")),
                    accession=str(first.get("AccessionNumber", "")),
                    series_description=str(first.get("SeriesDescription", "")),
                    model_label=ctx.model_label, software=ctx.software_version)


def render_page(result: InferenceResult, report: SeverityReport, source: SourceSeries,
                ctx: OutputContext, comparison: Comparison | None) -> npt.NDArray[np.uint8]:
    """The page's pixels (RGB)."""
    return render_summary(result, report, page_text(source, ctx), comparison)


def _source_refs(result: InferenceResult, source: SourceSeries) -> list[Dataset]:
    refs = []
    for k in key_slices(result):
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.datasets[k].SOPClassUID
        ref.ReferencedSOPInstanceUID = source.datasets[k].SOPInstanceUID
        refs.append(ref)
    return refs


def build_summary_sc(result: InferenceResult, page: npt.NDArray[np.uint8], source: SourceSeries,
                     ctx: OutputContext, *, description_suffix: str = "") -> Dataset:
    """The page as one RGB Secondary Capture image.

    Parameters
    ----------
    result:
        For the references to the key slices.
    page:
        Pixels from :func:`render_page`.
    source:
        Source headers.
    ctx:
        Producer identity.
    description_suffix:
        Appended to the series description.

    Returns
    -------
    Dataset
    """
    sc = hd.sc.SCImage(
        pixel_array=page, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=source.study_uid,
        series_instance_uid=new_uid(), series_number=ctx.series_number("summary"),
        sop_instance_uid=new_uid(), instance_number=1, manufacturer=ctx.manufacturer,
        patient_orientation=("L", "P"),
        transfer_syntax_uid=str(ExplicitVRLittleEndian))
    sc.PatientOrientation = []  # a page, not a view of the patient (type 2: empty)
    sc.SourceImageSequence = _source_refs(result, source)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}. {DOCUMENT_TITLE}, model {ctx.model_label}"
    sc.DerivationDescription = "Summary page: region table, key slices and coronal reformat"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.Laterality = ""
    return finish_output(sc, source, ctx,
                         series_description=f"AI lung report page{description_suffix}")


def build_pdf(result: InferenceResult, page: npt.NDArray[np.uint8], source: SourceSeries,
              ctx: OutputContext, *, description_suffix: str = "") -> Dataset:
    """The page as an Encapsulated PDF (Modality DOC).

    Parameters
    ----------
    result:
        For the references to the key slices.
    page:
        Pixels from :func:`render_page`.
    source:
        Source headers.
    ctx:
        Producer identity.
    description_suffix:
        Appended to the series description.

    Returns
    -------
    Dataset
    """
    buffer = io.BytesIO()
    Image.fromarray(page, mode="RGB").save(buffer, "PDF", resolution=124.0,
                                           title=DOCUMENT_TITLE, author=ctx.manufacturer)
    pdf = buffer.getvalue()
    if len(pdf) % 2:
        pdf += b"\x00"
    now = dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF
    uid = UID(new_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = uid
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = ctx.series_number("pdf")
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf
    ds.EncapsulatedDocumentLength = len(buffer.getvalue())
    refs = _source_refs(result, source)
    ds.SourceInstanceSequence = refs
    return finish_output(ds, source, ctx,
                         series_description=f"AI lung report PDF{description_suffix}")
