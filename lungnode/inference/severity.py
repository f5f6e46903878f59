"""Severity figures per region and per lung: volumes, PO, PHO, region scores and the total score.

This module owns the arithmetic of the radiologist's report (regions come from
:mod:`lungnode.inference.regions`):

* volumes (mL) of lung, infiltrate (= opacity), ground glass (-750 <= HU < -300), consolidation
  (HU >= -300) and high opacity (infiltrate with HU > ``pho_min_hu``, -200 by default), using the
  same per-slice voxel volumes as :mod:`lungnode.inference.measurements`;
* PO, percentage of opacity = infiltrate / lung x 100 (Chaganti et al. 2020, Radiology: AI
  2:e200048), which is also "percent of lung involved";
* PHO, percentage of high opacity = high opacity / lung x 100 (Chaganti et al. 2020);
* a score per region from its PO by :class:`ScoreScheme`, and the total over the regions.

Scoring schemes
---------------
A scheme is a list of cut-offs, one per score above 0: a region scores the number of cut-offs its
PO meets. Cut-offs are written ``">X"`` or ``">=X"`` (percent), so the edges of published tables
are explicit. The default, ``pan`` (Pan et al. 2020, Radiology 295:715, on lobes), is
``>0, >=5, >25, >=50, >75``: 0 none, 1 < 5 %, 2 5-25 %, 3 26-49 % (read as > 25 and < 50),
4 50-75 %, 5 > 75 %; total 0-25 on five lobes. On the six zones the same 0-5 grading per zone gives
0-30 (the six-zone layout of Ooi et al. 2004, graded with Pan's cut-offs). ``chung`` (Chung et
al. 2020, Radiology 295:202): ``>0, >25, >50, >75``, 0-4 per lobe, 0-20. Percentages are always
reported next to the scores so a site can apply its own scheme. A region is scored on its PO
as reported (rounded to 0.01 %), so the score and the printed percentage always agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from lungnode.inference.measurements import CONSOLIDATION_MIN_HU, GGO_MIN_HU
from lungnode.inference.regions import RegionMap
from lungnode.inference.types import SeriesVolume

__all__ = ["PHO_MIN_HU", "SCHEMES", "RegionStats", "ScoreScheme", "SeverityReport", "assess"]

#: Lower HU bound (exclusive) of high opacity (Chaganti et al. 2020).
PHO_MIN_HU = -200.0

_CUTOFF = re.compile(r"^\s*(>=|>)\s*(\d+(?:\.\d+)?)\s*%?\s*$")


@dataclass(frozen=True)
class ScoreScheme:
    """A region score from percent involvement.

    Attributes
    ----------
    name:
        Short name (``pan``, ``chung`` or a site's own).
    title:
        Citation shown in the report.
    cutoffs:
        One per score above 0, ascending: ``">0"``, ``">=5"``...
    """

    name: str
    title: str
    cutoffs: tuple[str, ...]

    def __post_init__(self) -> None:
        last = -1.0
        for c in self.cutoffs:
            m = _CUTOFF.match(c)
            if m is None:
                raise ValueError(f"score cut-off {c!r} is not '>X' or '>=X' (percent)")
            value = float(m.group(2))
            if value < last or value > 100:
                raise ValueError(f"score cut-offs must ascend within 0-100: {list(self.cutoffs)}")
            last = value

    @property
    def max_per_region(self) -> int:
        """Highest score of one region."""
        return len(self.cutoffs)

    def score(self, percent: float) -> int:
        """Score of a region with ``percent`` involvement."""
        total = 0
        for c in self.cutoffs:
            m = _CUTOFF.match(c)
            assert m is not None  # checked in __post_init__
            op, value = m.group(1), float(m.group(2))
            if (percent > value) if op == ">" else (percent >= value):
                total += 1
        return total


#: Schemes known by name (``[report] scheme``).
SCHEMES: dict[str, ScoreScheme] = {
    "pan": ScoreScheme("pan", "CT severity score, Pan et al. 2020 (0-5 per region)",
                       (">0", ">=5", ">25", ">=50", ">75")),
    "chung": ScoreScheme("chung", "CT severity score, Chung et al. 2020 (0-4 per region)",
                         (">0", ">25", ">50", ">75")),
}


@dataclass(frozen=True)
class RegionStats:
    """Figures of one region (or one lung, or both lungs)."""

    key: str
    name: str
    side: str
    lung_ml: float
    infiltrate_ml: float
    ground_glass_ml: float
    consolidation_ml: float
    high_opacity_ml: float
    score: int
    #: ``upper``/``middle``/``lower`` for a zone or lobe, empty for a lung.
    level: str = ""

    @property
    def po(self) -> float:
        """Percentage of opacity (= percent of the region involved)."""
        return 100.0 * self.infiltrate_ml / self.lung_ml if self.lung_ml > 0 else 0.0

    @property
    def pho(self) -> float:
        """Percentage of high opacity."""
        return 100.0 * self.high_opacity_ml / self.lung_ml if self.lung_ml > 0 else 0.0


@dataclass(frozen=True)
class SeverityReport:
    """The radiologist's figures for one series.

    Attributes
    ----------
    regions:
        One entry per zone or lobe, in :data:`~lungnode.inference.regions.ZONES` /
        :data:`~lungnode.inference.regions.LOBES` order.
    right, left, both:
        Per lung and both lungs; their ``score`` is the sum of their regions' scores.
    region_kind:
        ``"zones"`` or ``"lobes"``.
    rule, rule_text:
        How the regions were found (:class:`~lungnode.inference.regions.RegionMap`).
    scheme:
        The scoring scheme.
    pho_min_hu:
        The high-opacity threshold used.
    labels, carina_index:
        Region of every voxel and the carina slice (pictures of the regions).
    """

    regions: tuple[RegionStats, ...]
    right: RegionStats
    left: RegionStats
    both: RegionStats
    region_kind: str
    rule: str
    rule_text: str
    scheme: ScoreScheme
    pho_min_hu: float = PHO_MIN_HU
    #: The region of every voxel (:attr:`RegionMap.labels`), for pictures of the regions.
    labels: npt.NDArray[np.uint8] | None = field(default=None, compare=False, repr=False)
    #: Slice index of the carina when the zones were placed by it.
    carina_index: int | None = None

    @property
    def total_score(self) -> int:
        """Sum of the region scores."""
        return sum(r.score for r in self.regions)

    @property
    def max_score(self) -> int:
        """Highest possible total."""
        return self.scheme.max_per_region * len(self.regions)


def _stats(key: str, name: str, side: str, ml: npt.NDArray[np.float64], score: int,
           level: str = "") -> RegionStats:
    return RegionStats(key, name, side, lung_ml=float(ml[0]), infiltrate_ml=float(ml[1]),
                       ground_glass_ml=float(ml[2]), consolidation_ml=float(ml[3]),
                       high_opacity_ml=float(ml[4]), score=score, level=level)


def _sum(key: str, name: str, side: str, parts: list[RegionStats]) -> RegionStats:
    ml = np.array([sum(getattr(p, f) for p in parts) for f in (
        "lung_ml", "infiltrate_ml", "ground_glass_ml", "consolidation_ml", "high_opacity_ml")])
    return _stats(key, name, side, ml, sum(p.score for p in parts))


def assess(volume: SeriesVolume, regions: RegionMap, infiltrate: npt.NDArray[np.bool_],
           scheme: ScoreScheme | None = None, pho_min_hu: float = PHO_MIN_HU) -> SeverityReport:
    """Figures per region, per lung and for both lungs.

    Parameters
    ----------
    volume:
        The series (HU and voxel volumes).
    regions:
        Region of every lung voxel.
    infiltrate:
        Infiltrate mask (voxels outside the lungs are ignored).
    scheme:
        Scoring scheme (Pan when ``None``).
    pho_min_hu:
        High opacity is infiltrate with HU above this.

    Returns
    -------
    SeverityReport
    """
    scheme = scheme or SCHEMES["pan"]
    labels = regions.labels
    if labels.shape != infiltrate.shape or labels.shape != volume.hu.shape:
        raise ValueError("regions, infiltrate and volume must have the same shape")
    n_reg = len(regions.regions)
    _, dr, dc = volume.spacing_mm
    per_slice = volume.slice_thickness_weights() * dr * dc / 1000.0
    ml = np.zeros((5, n_reg + 1), np.float64)
    for k in np.flatnonzero(labels.any(axis=(1, 2))):
        lab = labels[k].ravel()
        h = volume.hu[k].ravel()
        inf = infiltrate[k].ravel() & (lab > 0)
        li = lab[inf]
        hi = h[inf]
        ggo = (hi >= GGO_MIN_HU) & (hi < CONSOLIDATION_MIN_HU)
        counts = (np.bincount(lab, minlength=n_reg + 1),
                  np.bincount(li, minlength=n_reg + 1),
                  np.bincount(li[ggo], minlength=n_reg + 1),
                  np.bincount(li[hi >= CONSOLIDATION_MIN_HU], minlength=n_reg + 1),
                  np.bincount(li[hi > pho_min_hu], minlength=n_reg + 1))
        ml += np.stack(counts)[:, : n_reg + 1] * per_slice[k]
    stats: list[RegionStats] = []
    for i, r in enumerate(regions.regions, start=1):
        po = 100.0 * ml[1, i] / ml[0, i] if ml[0, i] > 0 else 0.0
        stats.append(_stats(r.key, r.name, r.side, ml[:, i], scheme.score(round(po, 2)), r.level))
    right = _sum("right", "Right lung", "right", [s for s in stats if s.side == "right"])
    left = _sum("left", "Left lung", "left", [s for s in stats if s.side == "left"])
    both = _sum("both", "Both lungs", "both", [right, left])
    return SeverityReport(tuple(stats), right, left, both, regions.kind, regions.rule,
                          regions.rule_text, scheme, pho_min_hu, regions.labels,
                          regions.carina_index)

