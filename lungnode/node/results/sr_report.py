"""The radiologist's part of the TID 1500 SR: one measurement group per region, the total score,
the comparison with the prior exam and the impression text.

Content added to the Imaging Measurements of :func:`.sr.build_sr`::

    Measurement Group: <Right upper zone | Right upper lobe | ...>   (TID 1411)
      Tracking identifier = the region's name; Referenced Segment = the SEG's Lung segment
      Finding = Lung; Finding Site = the zone or lobe, with its laterality
      Volume [mL]                                     lung in the region
      Volume of opacity / ground-glass opacity / consolidation [mL]
      Percent of lung involved [%]  (PO)     Percent of lung with high opacity [%]  (PHO)
      CT severity score of region [{score}]  (method: the scheme)
      Change in percent of lung involved since prior [%]     (only with a prior)
    Measurement Group: Both lungs                                        (TID 1411)
      Finding Site = Lung, Right and left; Referenced Segment = the SEG's Infiltrate segment
      Total CT severity score and its maximum [{score}] (method), PO, PHO
      Region assignment method = carina / volume thirds / model lobes (qualitative evaluation)
      Change in PO [%], change in total score, days since the prior study  (only with a prior)
    Impression (DCM 121073, TEXT): the sentence of :func:`~lungnode.inference.comparison.impression`

Codes: lobes are SNOMED CT (upper/middle/lower lobe of right lung, upper/lower lobe of left lung);
lung zones, the indices and the scores have no standard code and are local codes of the
``99LUNGNODE`` scheme, declared in the Coding Scheme Identification Sequence (``LN....``).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

from lungnode.inference.comparison import Comparison, impression
from lungnode.inference.severity import RegionStats, SeverityReport
from lungnode.node.results.common import new_uid
from lungnode.node.results.seg import LUNG_TYPE

CC = hd.sr.CodedConcept
LOCAL_SCHEME = "99LUNGNODE"

PERCENT_INVOLVED = CC("LN0001", LOCAL_SCHEME, "Percent of lung involved")
PERCENT_HIGH_OPACITY = CC("LN0002", LOCAL_SCHEME, "Percent of lung with high opacity")
OPACITY_VOLUME = CC("LN0003", LOCAL_SCHEME, "Volume of opacity")
GGO_VOLUME = CC("LN0004", LOCAL_SCHEME, "Volume of ground-glass opacity")
CONSOLIDATION_VOLUME = CC("LN0005", LOCAL_SCHEME, "Volume of consolidation")
REGION_SCORE = CC("LN0006", LOCAL_SCHEME, "CT severity score of region")
TOTAL_SCORE = CC("LN0007", LOCAL_SCHEME, "Total CT severity score")
MAX_SCORE = CC("LN0008", LOCAL_SCHEME, "Maximum total CT severity score")
PO_CHANGE = CC("LN0010", LOCAL_SCHEME, "Change in percent of lung involved since prior")
SCORE_CHANGE = CC("LN0011", LOCAL_SCHEME, "Change in total CT severity score since prior")
DAYS_SINCE_PRIOR = CC("LN0012", LOCAL_SCHEME, "Days since prior study")
REGION_METHOD = CC("LN0020", LOCAL_SCHEME, "Region assignment method")
RULE_CODES = {
    "carina": CC("LNR01", LOCAL_SCHEME, "Zones by carina and lung volume"),
    "thirds": CC("LNR02", LOCAL_SCHEME, "Zones by thirds of lung volume"),
    "model-lobes": CC("LNR03", LOCAL_SCHEME, "Lobes segmented by the model"),
}
SCHEME_CODES = {
    "pan": CC("LNS01", LOCAL_SCHEME, "CT severity score, Pan et al. 2020"),
    "chung": CC("LNS02", LOCAL_SCHEME, "CT severity score, Chung et al. 2020"),
}
SITE_SCHEME = CC("LNS99", LOCAL_SCHEME, "CT severity score, site cut-offs")
ZONE_CODES = {
    "upper": CC("LNZ01", LOCAL_SCHEME, "Upper lung zone"),
    "middle": CC("LNZ02", LOCAL_SCHEME, "Middle lung zone"),
    "lower": CC("LNZ03", LOCAL_SCHEME, "Lower lung zone"),
}
LOBE_CODES = {
    "rul": CC("45653009", "SCT", "Upper lobe of right lung"),
    "rml": CC("72481006", "SCT", "Middle lobe of right lung"),
    "rll": CC("266005", "SCT", "Lower lobe of right lung"),
    "lul": CC("44714003", "SCT", "Upper lobe of left lung"),
    "lll": CC("90572001", "SCT", "Lower lobe of left lung"),
}
IMPRESSION = CC("121073", "DCM", "Impression")
VOLUME = CC("118565006", "SCT", "Volume")
ML = CC("mL", "UCUM", "milliliter")
PERCENT = CC("%", "UCUM", "percent")
SCORE_UNIT = CC("{score}", "UCUM", "score")
DAYS = CC("d", "UCUM", "day")
LATERALITY = {
    "left": CC("7771000", "SCT", "Left"),
    "right": CC("24028007", "SCT", "Right"),
    "both": CC("51440002", "SCT", "Right and left"),
}


def region_site(region: RegionStats) -> hd.sr.FindingSite:
    """Finding site of a region: lobe (SNOMED CT) or zone (local), with laterality."""
    code = LOBE_CODES.get(region.key) or ZONE_CODES.get(region.level) or LUNG_TYPE
    return hd.sr.FindingSite(anatomic_location=code, laterality=LATERALITY[region.side])


def scheme_code(report: SeverityReport) -> hd.sr.CodedConcept:
    """Method code of the report's score scheme."""
    return SCHEME_CODES.get(report.scheme.name, SITE_SCHEME)


def _m(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept,
       algorithm: hd.sr.AlgorithmIdentification, site: hd.sr.FindingSite,
       method: hd.sr.CodedConcept | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 2), unit=unit,
                             algorithm_id=algorithm, finding_sites=[site], method=method)


def region_measurements(region: RegionStats, report: SeverityReport,
                        algorithm: hd.sr.AlgorithmIdentification,
                        comparison: Comparison | None) -> list[hd.sr.Measurement]:
    """The measurements of one region's group."""
    site = region_site(region)
    out = [
        _m(VOLUME, region.lung_ml, ML, algorithm, site),
        _m(OPACITY_VOLUME, region.infiltrate_ml, ML, algorithm, site),
        _m(GGO_VOLUME, region.ground_glass_ml, ML, algorithm, site),
        _m(CONSOLIDATION_VOLUME, region.consolidation_ml, ML, algorithm, site),
        _m(PERCENT_INVOLVED, region.po, PERCENT, algorithm, site),
        _m(PERCENT_HIGH_OPACITY, region.pho, PERCENT, algorithm, site),
        _m(REGION_SCORE, region.score, SCORE_UNIT, algorithm, site, scheme_code(report)),
    ]
    change = comparison.region_change(report, region.key) if comparison is not None else None
    if change is not None:
        out.append(_m(PO_CHANGE, change, PERCENT, algorithm, site))
    return out


def total_measurements(report: SeverityReport, algorithm: hd.sr.AlgorithmIdentification,
                       comparison: Comparison | None) -> list[hd.sr.Measurement]:
    """The measurements of the both-lungs group: total score, PO, PHO, change since the prior."""
    site = hd.sr.FindingSite(anatomic_location=LUNG_TYPE, laterality=LATERALITY["both"])
    out = [
        _m(TOTAL_SCORE, report.total_score, SCORE_UNIT, algorithm, site, scheme_code(report)),
        _m(MAX_SCORE, report.max_score, SCORE_UNIT, algorithm, site, scheme_code(report)),
        _m(PERCENT_INVOLVED, report.both.po, PERCENT, algorithm, site),
        _m(PERCENT_HIGH_OPACITY, report.both.pho, PERCENT, algorithm, site),
    ]
    if comparison is not None and comparison.prior is not None:
        po_change = comparison.po_change(report)
        if po_change is not None:
            out.append(_m(PO_CHANGE, po_change, PERCENT, algorithm, site))
        score_change = comparison.score_change(report)
        if score_change is not None:
            out.append(_m(SCORE_CHANGE, score_change, SCORE_UNIT, algorithm, site,
                          scheme_code(report)))
        if comparison.days is not None:
            out.append(_m(DAYS_SINCE_PRIOR, comparison.days, DAYS, algorithm, site))
    return out


def report_groups(report: SeverityReport, comparison: Comparison | None,
                  algorithm: hd.sr.AlgorithmIdentification, lung_segment: hd.sr.ReferencedSegment,
                  infiltrate_segment: hd.sr.ReferencedSegment,
                  ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One group per region plus the both-lungs group.

    Parameters
    ----------
    report:
        The figures.
    comparison:
        The prior exam (``None``: priors not looked up).
    algorithm:
        Model identification.
    lung_segment, infiltrate_segment:
        References to the SEG's segments.

    Returns
    -------
    list
        Groups to append to the Imaging Measurements.
    """
    groups = []
    for region in report.regions:
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(), identifier=region.name),
            referenced_segment=lung_segment, finding_type=LUNG_TYPE, algorithm_id=algorithm,
            finding_sites=[region_site(region)],
            measurements=region_measurements(region, report, algorithm, comparison)))
    method = hd.sr.QualitativeEvaluation(name=REGION_METHOD, value=RULE_CODES[report.rule])
    groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(), identifier="Both lungs"),
        referenced_segment=infiltrate_segment, finding_type=LUNG_TYPE, algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG_TYPE,
                                         laterality=LATERALITY["both"])],
        measurements=total_measurements(report, algorithm, comparison),
        qualitative_evaluations=[method]))
    return groups


def impression_item(report: SeverityReport, comparison: Comparison | None) -> Dataset:
    """The Impression TEXT item (appended to the report's root container)."""
    return hd.sr.TextContentItem(name=IMPRESSION, value=impression(report, comparison)[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(keyword)
    return str(seq[0].CodeValue) if seq else ""


def _numbers(group: Dataset) -> dict[str, tuple[float, str]]:
    """NUM items of a group: code -> (value, method code)."""
    out: dict[str, tuple[float, str]] = {}
    for item in group.get("ContentSequence", []):
        if item.ValueType == "NUM" and item.get("MeasuredValueSequence"):
            method = ""
            for mod in item.get("ContentSequence", []):
                if _code(mod) == "370129005":  # Measurement Method
                    method = _code(mod, "ConceptCodeSequence")
            out[_code(item)] = (float(item.MeasuredValueSequence[0].NumericValue), method)
    return out


def read_report_figures(sr: Dataset) -> dict[str, object] | None:
    """The figures of one of our SRs in :func:`~lungnode.inference.comparison.report_to_dict`
    form (the parts a prior comparison needs), or ``None`` when it has no region groups.

    Parameters
    ----------
    sr:
        A lungnode TID 1500 SR (as built by :func:`.sr.build_sr` with a report).

    Returns
    -------
    dict or None
    """
    from lungnode.inference.regions import LOBES, ZONES

    keys = {r.name: r.key for r in (*ZONES, *LOBES)}
    schemes = {code.value: name for name, code in SCHEME_CODES.items()}
    regions: list[dict[str, object]] = []
    total: dict[str, tuple[float, str]] | None = None
    for container in sr.get("ContentSequence", []):
        if _code(container) != "126010":  # Imaging Measurements
            continue
        for group in container.get("ContentSequence", []):
            name = next((str(i.TextValue) for i in group.get("ContentSequence", [])
                         if _code(i) == "112039"), "")  # Tracking Identifier
            numbers = _numbers(group)
            if name == "Both lungs" and TOTAL_SCORE.value in numbers:
                total = numbers
            elif name in keys and PERCENT_INVOLVED.value in numbers:
                regions.append({"key": keys[name], "name": name,
                                "po": numbers[PERCENT_INVOLVED.value][0],
                                "score": int(numbers.get(REGION_SCORE.value, (0.0, ""))[0])})
    if total is None or not regions:
        return None
    score, method = total[TOTAL_SCORE.value]
    both = {"key": "both", "po": total.get(PERCENT_INVOLVED.value, (0.0, ""))[0],
            "pho": total.get(PERCENT_HIGH_OPACITY.value, (0.0, ""))[0]}
    kind = "lobes" if regions[0]["key"] in {r.key for r in LOBES} else "zones"
    return {"regions": regions, "lungs": [{}, {}, both], "region_kind": kind,
            "scheme": schemes.get(method, "site"), "total_score": int(score),
            "max_score": int(total.get(MAX_SCORE.value, (0.0, ""))[0])}
