"""Comparison with the prior exam, and the impression sentence of the report.

Owns
----
* :func:`report_to_dict` / :class:`PriorFigures`: the figures of a report as JSON (stored with the
  job, so a later study of the same patient can be compared with it) and read back.
* :class:`Comparison`: the prior's figures and the change (percentage points, score, days), or
  the reason there is no comparison (no prior, Patient ID missing...). Which prior is the right
  one (same Patient ID and Issuer, earlier Study Date) is decided by the caller in ``node/``.
* :func:`impression`: one sentence a radiologist can paste into a report.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from lungnode.inference.severity import SeverityReport

__all__ = ["Comparison", "PriorFigures", "format_date", "format_percent", "impression",
           "report_to_dict"]

#: Changes smaller than this (percentage points of PO) read "unchanged".
UNCHANGED_PP = 1.0


def report_to_dict(report: SeverityReport) -> dict[str, Any]:
    """JSON-serialisable figures of a report (what :class:`PriorFigures` reads back)."""

    def stats(r: Any) -> dict[str, Any]:
        return {"key": r.key, "name": r.name, "lung_ml": round(r.lung_ml, 2),
                "infiltrate_ml": round(r.infiltrate_ml, 2), "po": round(r.po, 2),
                "pho": round(r.pho, 2), "ground_glass_ml": round(r.ground_glass_ml, 2),
                "consolidation_ml": round(r.consolidation_ml, 2), "score": r.score}

    return {"regions": [stats(r) for r in report.regions],
            "lungs": [stats(r) for r in (report.right, report.left, report.both)],
            "region_kind": report.region_kind, "rule": report.rule,
            "scheme": report.scheme.name, "total_score": report.total_score,
            "max_score": report.max_score, "pho_min_hu": report.pho_min_hu}


@dataclass(frozen=True)
class PriorFigures:
    """The figures of an earlier exam of the same patient.

    Attributes
    ----------
    study_date:
        ``YYYYMMDD`` of the prior study.
    study_uid:
        Its Study Instance UID.
    po, pho:
        Both lungs.
    total_score, max_score, scheme, region_kind:
        Its severity score and how it was scored.
    region_po:
        PO per region key.
    source:
        Where the figures came from (``"node job 12"``, ``"PACS SR 1.2..."``).
    """

    study_date: str
    study_uid: str
    po: float
    pho: float
    total_score: int
    max_score: int
    scheme: str
    region_kind: str
    region_po: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_report_dict(cls, d: dict[str, Any], study_date: str, study_uid: str,
                         source: str) -> PriorFigures:
        """Read :func:`report_to_dict` output back (``KeyError`` when it is not one)."""
        both = d["lungs"][2]
        return cls(study_date=study_date, study_uid=study_uid, po=float(both["po"]),
                   pho=float(both["pho"]), total_score=int(d["total_score"]),
                   max_score=int(d["max_score"]), scheme=str(d["scheme"]),
                   region_kind=str(d["region_kind"]),
                   region_po={str(r["key"]): float(r["po"]) for r in d["regions"]},
                   source=source)


def _date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def format_date(text: str) -> str:
    """``YYYYMMDD`` as ``YYYY-MM-DD`` (unchanged when it is not a date)."""
    d = _date(text)
    return d.isoformat() if d else text


def format_percent(value: float) -> str:
    """Percent as radiologists write it: whole numbers from 10 %, one decimal below."""
    return f"{value:.0f} %" if value >= 10 else f"{value:.1f} %"


@dataclass(frozen=True)
class Comparison:
    """The prior exam's figures and the change, or why there is none.

    Attributes
    ----------
    prior:
        The prior's figures, ``None`` when there is no comparison.
    note:
        Why there is no comparison (empty when there is one).
    days:
        Days between the prior and the current study (``None`` when a date is missing).
    """

    prior: PriorFigures | None
    note: str = ""
    days: int | None = None

    @classmethod
    def none(cls, note: str) -> Comparison:
        """No comparison, with the reason the report prints."""
        return cls(None, note)

    @classmethod
    def of(cls, prior: PriorFigures, current_study_date: str) -> Comparison:
        """Compare with ``prior`` (days from the two study dates)."""
        a, b = _date(prior.study_date), _date(current_study_date)
        return cls(prior, "", (b - a).days if a and b else None)

    def po_change(self, report: SeverityReport) -> float | None:
        """Change of PO (both lungs), percentage points."""
        return None if self.prior is None else report.both.po - self.prior.po

    def score_change(self, report: SeverityReport) -> int | None:
        """Change of the total score (``None`` when the schemes or regions differ)."""
        if self.prior is None or not self.comparable_scores(report):
            return None
        return report.total_score - self.prior.total_score

    def comparable_scores(self, report: SeverityReport) -> bool:
        """Whether both scores use the same scheme on the same kind of regions."""
        return (self.prior is not None and self.prior.scheme == report.scheme.name
                and self.prior.region_kind == report.region_kind
                and self.prior.max_score == report.max_score)

    def region_change(self, report: SeverityReport, key: str) -> float | None:
        """Change of one region's PO, percentage points (``None`` when the prior lacks it)."""
        if self.prior is None or key not in self.prior.region_po:
            return None
        current = next((r.po for r in report.regions if r.key == key), None)
        return None if current is None else current - self.prior.region_po[key]


def _opacity_kind(report: SeverityReport) -> str:
    b = report.both
    ggo, cons = b.ground_glass_ml, b.consolidation_ml
    if ggo > 0 and cons > 0 and min(ggo, cons) >= 0.1 * (ggo + cons):
        return "ground-glass opacity and consolidation"
    return "consolidation" if cons > ggo else "ground-glass opacity"


def _laterality(report: SeverityReport) -> str:
    right, left = report.right.po >= 0.1, report.left.po >= 0.1
    if right and left:
        return "Bilateral"
    return "Right-sided" if right else "Left-sided"


def impression(report: SeverityReport, comparison: Comparison | None = None) -> str:
    """The report's impression in one or two sentences.

    Examples: "Bilateral ground-glass opacity and consolidation involving 23 % of the lungs,
    most in the right lower zone; severity score 12/30 (Pan 2020, zones). Up from 12 % on
    2026-11-02 (4 days; score 7/30)."
    """
    b = report.both
    score = f"severity score {report.total_score}/{report.max_score} " \
            f"({report.scheme.name.capitalize()} 2020, {report.region_kind})"
    if b.infiltrate_ml <= 0:
        text = f"No lung opacity found by the model; {score}."
    elif b.po < 0.05:  # a trace still scores in its region: say so rather than "none"
        text = (f"Only traces of lung opacity found by the model ({b.infiltrate_ml:.1f} mL, under "
                f"0.05 % of the lungs); {score}.")
    else:
        worst = max(report.regions, key=lambda r: r.po)
        text = (f"{_laterality(report)} {_opacity_kind(report)} involving "
                f"{format_percent(b.po)} of the lungs (high opacity {format_percent(b.pho)}), "
                f"most in the {worst.name.lower()}; {score}.")
    if comparison is None:
        return text
    if comparison.prior is None:
        return f"{text} {comparison.note}".strip()
    p = comparison.prior
    change = b.po - p.po
    when = f"on {format_date(p.study_date)}"
    if comparison.days is not None:
        when += f" ({comparison.days} days earlier"
    else:
        when += " ("
    when += f"; score {p.total_score}/{p.max_score})" if comparison.days is not None \
        else f"score {p.total_score}/{p.max_score})"
    if abs(change) < UNCHANGED_PP:
        return f"{text} Unchanged from {format_percent(p.po)} {when}."
    trend = "Up" if change > 0 else "Down"
    return f"{text} {trend} from {format_percent(p.po)} {when}."
