"""TID 1500 Measurement Report (Comprehensive SR) with the volumes of lungs and infiltrate.

Tree (``dsrdump`` shows it)::

    Imaging Measurement Report (DCM 126000)
      Language, Observer Type = Device (lungnode node UID, name, manufacturer, model)
      Procedure reported = CT of chest (SCT 169069000)
      Imaging Measurements
        Measurement Group: Lung  (tracking UID = the SEG segment's, references SEG segment 1)
          Finding = Lung, Finding Site = Lung, Algorithm = model name/version
          Volume [mL] (finding site Lung, laterality Left | Right | Right and left)
        Measurement Group: Infiltrate  (references SEG segment 2)
          Finding = Infiltrate, Finding Site = Lung, Algorithm = model name/version
          Volume [mL]                     left, right, both
          Percent of lung involved [%]    left, right, both
        Measurement Group per zone or lobe, and one for both lungs (total score, PO, PHO,
          change since the prior exam): see :mod:`.sr_report`
      Impression (DCM 121073): one sentence a radiologist can paste into a report

The document title stays "Imaging Measurement Report" (what OHIF and PACS recognise as TID 1500);
the series description carries the headline figures ("AI lung report PO 23.0% score 12/30").

"Percent of lung involved" has no standard code: it is ``(LN0001, 99LUNGNODE, "Percent of lung
involved")`` in our local coding scheme ``99LUNGNODE``, declared in the Coding Scheme
Identification Sequence; it is the infiltrate volume divided by the lung volume of the same side,
times 100. Volumes use UCUM ``mL``.

When a job supersedes an earlier one (late instances), the new SR lists the superseded job's SR
in Predecessor Documents Sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lungnode.inference.comparison import Comparison
from lungnode.inference.severity import SeverityReport
from lungnode.inference.types import Measurements, RegionMeasurement
from lungnode.node.results.common import OutputContext, SourceSeries, finish_output, new_uid
from lungnode.node.results.seg import LUNG_TYPE, MODEL_NAME, SegmentSpec
from lungnode.node.results.sr_report import (
    CC,
    LATERALITY,
    LOCAL_SCHEME,
    ML,
    PERCENT,
    PERCENT_INVOLVED,
    VOLUME,
    impression_item,
    report_groups,
)

CT_CHEST = CC("169069000", "SCT", "CT of chest")


def _regions(measurements: Measurements) -> dict[str, RegionMeasurement]:
    return {"left": measurements.left, "right": measurements.right, "both": measurements.both}


def _site(side: str) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(anatomic_location=LUNG_TYPE, laterality=LATERALITY[side])


def _measurements(spec: SegmentSpec, measurements: Measurements,
                  algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    out: list[hd.sr.Measurement] = []
    regions = _regions(measurements)
    for side, region in regions.items():
        value = region.lung_ml if spec.key == "lung" else region.infiltrate_ml
        out.append(hd.sr.Measurement(name=VOLUME, value=round(float(value), 2), unit=ML,
                                     algorithm_id=algorithm, finding_sites=[_site(side)]))
    if spec.key == "infiltrate":
        for side, region in regions.items():
            out.append(hd.sr.Measurement(name=PERCENT_INVOLVED,
                                         value=round(float(region.percent_involved), 2),
                                         unit=PERCENT, algorithm_id=algorithm,
                                         finding_sites=[_site(side)]))
    return out


def _find_segment(segs: Sequence[Dataset], label: str) -> tuple[Dataset, int]:
    for seg in segs:
        for item in seg.SegmentSequence:
            if str(item.SegmentLabel) == label:
                return seg, int(item.SegmentNumber)
    raise ValueError(f"no SEG holds a segment labelled {label!r}")


def _coding_scheme_item() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "lungnode local codes"
    item.CodingSchemeResponsibleOrganization = "lungnode"
    return item


def build_sr(source: SourceSeries, segs: Sequence[Dataset], specs: Sequence[SegmentSpec],
             measurements: Measurements, ctx: OutputContext, *,
             predecessor: Dataset | None = None, series_uid: str | None = None,
             description_suffix: str = "", report: SeverityReport | None = None,
             comparison: Comparison | None = None) -> Dataset:
    """Build the TID 1500 Comprehensive SR.

    Parameters
    ----------
    source:
        Source headers (patient and study are copied from here).
    segs:
        The SEG instance(s) of the same destination; each group references its segment in the
        first SEG that holds it (with split SEGs: the first part).
    specs:
        The segments (tracking UIDs are reused as the groups' tracking identifiers).
    measurements:
        Volumes from inference.
    ctx:
        Producer identity.
    predecessor:
        The SR this one replaces (Predecessor Documents Sequence), or ``None``.
    series_uid:
        SR series UID (fresh when ``None``).
    description_suffix:
        Appended to the series description.
    report:
        Figures per region (:mod:`.sr_report` groups and the impression) when given.
    comparison:
        The prior exam, or why there is none.

    Returns
    -------
    Dataset
        A :class:`highdicom.sr.ComprehensiveSR`.
    """
    algorithm = hd.sr.AlgorithmIdentification(name=ctx.model.name[:64],
                                              version=ctx.model.version[:64])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.observer_uid(), name=ctx.station_ae, manufacturer_name=ctx.manufacturer,
            model_name=MODEL_NAME))
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    refs: dict[str, hd.sr.ReferencedSegment] = {}
    for spec in specs:
        seg, number = _find_segment(segs, spec.label)
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(source.series_uid))
        refs[spec.key] = referenced
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=spec.tracking_uid,
                                                         identifier=spec.label),
            referenced_segment=referenced,
            finding_type=spec.property_type,
            algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG_TYPE)],
            measurements=_measurements(spec, measurements, algorithm),
        ))
    if report is not None:
        groups.extend(report_groups(report, comparison, algorithm, refs["lung"],
                                    refs["infiltrate"]))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_CHEST,
        imaging_measurements=groups,
    )[0]
    if report is not None:  # TID 1500 is extensible: the impression follows the measurements
        content.ContentSequence.append(impression_item(report, comparison))
    sr = hd.sr.ComprehensiveSR(
        evidence=list(segs),
        content=content,
        series_instance_uid=series_uid or new_uid(),
        series_number=ctx.series_number("sr"),
        sop_instance_uid=new_uid(),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        is_complete=True,
        previous_versions=[predecessor] if predecessor is not None else None,
    )
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_item()]
    description = "AI lung infiltrate report"
    if report is not None:  # what a PACS study list shows next to the series
        description = (f"AI lung report PO {report.both.po:.1f}% "
                       f"score {report.total_score}/{report.max_score}")
    finish_output(sr, source, ctx, series_description=f"{description}{description_suffix}")
    return sr
