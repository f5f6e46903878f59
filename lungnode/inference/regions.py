"""Lung regions a radiologist scores: three zones per lung, or the five lobes.

This module owns the *assignment* of every lung voxel to one region (the figures per region are
in :mod:`lungnode.inference.severity`).

Zones (the default: the models shipped today have no lobe classes)
------------------------------------------------------------------
Each lung is split craniocaudally into an upper, a middle and a lower zone, the six-zone layout
of Ooi et al. 2004 (Radiology 230:836, SARS CT scoring: upper zone above the carina, middle zone
between the carina and the inferior pulmonary veins, lower zone below them). The node finds:

* **the carina**, by following the trachea (an air column, HU < -800, 50-700 mm², within 30 mm
  of the body's midline and in the middle of its depth) from the top of the series down to the
  first slice where it divides into two main bronchi side by side (at least 10 mm apart
  left-right, seen on two consecutive slices, 15-60 % of the lungs' height below the apex).
  Rule ``"carina"``: upper zone = the lung cranial to that slice; the lung caudal to it is
  halved by volume into middle and lower zone (the inferior pulmonary veins are **not**
  detected; halving the infracarinal lung is this module's stated stand-in for that landmark).
* when the trachea or its division is not found (series starting below the carina, tracheal
  tubes, unusual anatomy), rule ``"thirds"``: each lung is split into thirds of its own
  craniocaudal volume.

Boundaries run along whole slices (axial planes). The rule used is returned
(:attr:`RegionMap.rule`, :attr:`RegionMap.rule_text`) and printed in the SR and the summary page.

Lobes
-----
When the model bundle declares the lobe classes :data:`LOBE_CLASSES`, the caller gives a lobe
label image (1-5 in that order) and :func:`lobe_regions` returns the five lobes (rule
``"model-lobes"``). Lung voxels the model put in no lobe go to the nearest labelled lobe of the
same lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lungnode.inference.types import LUNG_LEFT, LUNG_RIGHT, SeriesVolume

__all__ = ["LOBES", "LOBE_CLASSES", "ZONES", "RegionDef", "RegionMap", "assign_zones",
           "cranial_heights", "find_carina", "lobe_regions"]


@dataclass(frozen=True)
class RegionDef:
    """One scored region.

    Attributes
    ----------
    key:
        Stable identifier (``right_upper``, ``rul``...).
    name:
        Display name ("Right upper zone", "Right upper lobe").
    side:
        ``"right"`` or ``"left"``.
    level:
        ``"upper"``, ``"middle"`` or ``"lower"``.
    kind:
        ``"zone"`` or ``"lobe"``.
    short:
        Abbreviation used in tables (RU, RUL...).
    """

    key: str
    name: str
    side: str
    level: str
    kind: str
    short: str


def _zone(side: str, level: str) -> RegionDef:
    return RegionDef(f"{side}_{level}", f"{side.capitalize()} {level} zone", side, level, "zone",
                     f"{side[0].upper()}{level[0].upper()}")


#: The six zones, label values 1-6 in this order.
ZONES: tuple[RegionDef, ...] = tuple(_zone(s, lv) for s in ("right", "left")
                                     for lv in ("upper", "middle", "lower"))
#: The five lobes, label values 1-5 in this order.
LOBES: tuple[RegionDef, ...] = (
    RegionDef("rul", "Right upper lobe", "right", "upper", "lobe", "RUL"),
    RegionDef("rml", "Right middle lobe", "right", "middle", "lobe", "RML"),
    RegionDef("rll", "Right lower lobe", "right", "lower", "lobe", "RLL"),
    RegionDef("lul", "Left upper lobe", "left", "upper", "lobe", "LUL"),
    RegionDef("lll", "Left lower lobe", "left", "lower", "lobe", "LLL"),
)
#: Bundle class names that make a model a lobe model (channel order does not matter).
LOBE_CLASSES: tuple[str, ...] = ("lobe_rul", "lobe_rml", "lobe_rll", "lobe_lul", "lobe_lll")

RULE_TEXT = {
    "carina": "zones: upper above the carina (found on the airway tree); below it, the lung "
              "volume halved into middle and lower zone",
    "thirds": "zones: thirds of each lung's craniocaudal volume (carina not found)",
    "model-lobes": "lobes segmented by the model",
}

#: Trachea search: lumen HU, cross-section limits (mm²), distance from the midline (mm).
AIRWAY_HU = -800.0
TRACHEA_MIN_MM2 = 50.0
TRACHEA_MAX_MM2 = 700.0
MIDLINE_MM = 30.0
BRONCHUS_MIN_MM2 = 30.0
#: Plausible depth of the carina below the lung apex, as a fraction of the lungs' height.
CARINA_DEPTH = (0.15, 0.6)


@dataclass(frozen=True)
class RegionMap:
    """Every lung voxel's region.

    Attributes
    ----------
    labels:
        ``uint8`` ``(slices, rows, columns)``: 0 outside the lungs, ``i + 1`` for ``regions[i]``.
    regions:
        The regions (:data:`ZONES` or :data:`LOBES`).
    rule:
        ``"carina"``, ``"thirds"`` or ``"model-lobes"``.
    carina_index:
        Slice index of the carina (first slice with two main bronchi), when found.
    """

    labels: npt.NDArray[np.uint8]
    regions: tuple[RegionDef, ...]
    rule: str
    carina_index: int | None = None

    @property
    def kind(self) -> str:
        """``"zones"`` or ``"lobes"``."""
        return "lobes" if self.regions and self.regions[0].kind == "lobe" else "zones"

    @property
    def rule_text(self) -> str:
        """How the regions were found, for the report."""
        return RULE_TEXT[self.rule]


def cranial_heights(volume: SeriesVolume) -> npt.NDArray[np.float64]:
    """Height of each slice towards the head (mm, larger = more cranial).

    Patient z (LPS) grows towards the head; the slice normal's z component says whether axis 0
    runs up or down.
    """
    sign = 1.0 if volume.direction[2][2] >= 0 else -1.0
    return sign * volume.slice_positions()


def _in_mediastinum(hu_slice: npt.NDArray[np.floating], rows: npt.NDArray[np.intp],
                   cols: npt.NDArray[np.intp], dc: float) -> bool:
    """Whether a component lies where the trachea runs: within :data:`MIDLINE_MM` of the body's
    left-right middle and in the middle 20-70 % of its front-back depth."""
    body = hu_slice > -500
    bc = np.flatnonzero(body.any(axis=0))
    br = np.flatnonzero(body.any(axis=1))
    if bc.size == 0 or br.size == 0:
        return False
    mid = (bc[0] + bc[-1]) / 2
    depth = (rows.mean() - br[0]) / max(br[-1] - br[0], 1)
    return bool(abs(cols.mean() - mid) * dc <= MIDLINE_MM and 0.2 <= depth <= 0.7)


def _air_components(hu_slice: npt.NDArray[np.floating]) -> tuple[npt.NDArray[np.int32], int]:
    """Air components of one slice (HU < :data:`AIRWAY_HU`) not touching the image border."""
    air = hu_slice < AIRWAY_HU
    lab, n = ndimage.label(air)
    if n:
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        lab[np.isin(lab, border[border > 0])] = 0
    return lab, n


def _bronchi_apart(lab: npt.NDArray[np.int32], ids: npt.NDArray[np.int64], dr: float,
                   dc: float) -> bool:
    """Whether the two largest components lie side by side (main bronchi), not one behind the
    other (trachea and oesophagus): at least 10 mm apart left-right, more than front-back."""
    sizes = [np.count_nonzero(lab == i) for i in ids]
    two = [ids[j] for j in np.argsort(sizes)[-2:]]
    (r0, c0), (r1, c1) = (np.argwhere(lab == i).mean(axis=0) for i in two)
    lateral, ap = abs(c0 - c1) * dc, abs(r0 - r1) * dr
    return bool(lateral >= 10.0 and lateral > ap)


def find_carina(volume: SeriesVolume, lung_labels: npt.NDArray[np.uint8]) -> int | None:
    """Slice index of the carina (first slice below the trachea with two main bronchi).

    Parameters
    ----------
    volume:
        The series in HU.
    lung_labels:
        Lung mask (airways are not part of it).

    Returns
    -------
    int or None
        ``None`` when no trachea is found at the top of the series or it is lost before it divides.
    """
    hu = volume.hu
    _, dr, dc = volume.spacing_mm
    px_mm2 = dr * dc
    heights = cranial_heights(volume)
    order = np.argsort(-heights)  # cranial to caudal
    lung_rows = np.flatnonzero(lung_labels.any(axis=(1, 2)))
    if lung_rows.size == 0:
        return None
    lung_top, lung_bottom = heights[lung_rows].max(), heights[lung_rows].min()
    grow = ndimage.generate_binary_structure(2, 1)
    reach = max(1, round(5.0 / min(dr, dc)))  # 5 mm between slices
    trachea: npt.NDArray[np.bool_] | None = None
    run = 0
    split_at: int | None = None
    for k in order:
        lab, n = _air_components(hu[k])
        if trachea is None:
            if heights[k] < lung_bottom + 0.5 * (lung_top - lung_bottom):
                return None  # no trachea in the upper half of the lungs' extent
            if n == 0:
                continue
            areas = np.bincount(lab.ravel(), minlength=n + 1) * px_mm2
            found = None
            for i in np.flatnonzero((areas >= TRACHEA_MIN_MM2) & (areas <= TRACHEA_MAX_MM2)):
                if i == 0:
                    continue
                rows, cols = np.nonzero(lab == i)
                if _in_mediastinum(hu[k], rows, cols, dc):
                    found = lab == i
                    break
            if found is None:
                continue
            trachea, run = found, 1
            continue
        near = ndimage.binary_dilation(trachea, grow, iterations=reach)
        hits = np.unique(lab[near & (lab > 0)])
        areas = np.array([np.count_nonzero(lab == i) * px_mm2 for i in hits])
        # lung parenchyma touching the airway is far larger than any airway: not a branch
        big = hits[(areas >= BRONCHUS_MIN_MM2) & (areas <= TRACHEA_MAX_MM2)]
        if big.size == 0:  # lost (or a false start): look for the trachea again lower down
            trachea, run, split_at = None, 0, None
            continue
        if big.size >= 2 and run >= 3 and _bronchi_apart(lab, big, dr, dc):
            depth = (lung_top - heights[k]) / max(lung_top - lung_bottom, 1e-6)
            if depth > CARINA_DEPTH[1]:
                return None
            if split_at is not None and depth >= CARINA_DEPTH[0]:
                return split_at  # seen on two consecutive slices: the carina
            split_at = int(k)
        else:
            split_at = None
        merged = np.isin(lab, big)
        trachea, run = merged, run + 1
    return None


def _split_by_volume(counts: npt.NDArray[np.float64], order: npt.NDArray[np.int64],
                     fractions: tuple[float, ...]) -> npt.NDArray[np.int64]:
    """Zone index (0, 1, ...) per slice along ``order``, cutting the cumulative volume at
    ``fractions`` (slice centres)."""
    c = counts[order]
    total = c.sum()
    zone = np.zeros(counts.shape[0], np.int64)
    if total <= 0:
        return zone
    centre = (np.cumsum(c) - c / 2) / total
    zone[order] = np.searchsorted(np.asarray(fractions), centre, side="right")
    return zone


def assign_zones(volume: SeriesVolume, lung_labels: npt.NDArray[np.uint8],
                 carina_index: int | None = None, *, use_carina: bool = True) -> RegionMap:
    """Split each lung into upper, middle and lower zone (see the module docstring).

    Parameters
    ----------
    volume:
        The series (HU and slice positions).
    lung_labels:
        0 background, 1 right lung, 2 left lung.
    carina_index:
        Carina slice when already known; found with :func:`find_carina` when ``None``.
    use_carina:
        ``False`` forces the volume-thirds rule.

    Returns
    -------
    RegionMap
        Labels 1-6 = :data:`ZONES`.
    """
    heights = cranial_heights(volume)
    order = np.argsort(-heights, kind="stable")
    weights = volume.slice_thickness_weights()
    carina = (carina_index if carina_index is not None else find_carina(volume, lung_labels)) \
        if use_carina else None
    n = lung_labels.shape[0]
    rows = np.flatnonzero(lung_labels.any(axis=(1, 2)))
    per_label = np.zeros((n, 3), np.float64)  # voxels of labels 0, 1, 2 per slice
    for k in rows:
        per_label[k] = np.bincount(lung_labels[k].ravel(), minlength=3)[:3]
    table = np.zeros((n, 3), np.uint8)  # slice, lung label -> region label
    for s, value in enumerate((LUNG_RIGHT, LUNG_LEFT)):
        counts = per_label[:, value] * weights
        if carina is None:
            zone = _split_by_volume(counts, order, (1 / 3, 2 / 3))
        else:
            above = heights > heights[carina]
            below_order = order[~above[order]]
            zone = np.zeros(counts.shape[0], np.int64)
            zone[~above] = 1 + _split_by_volume(counts, below_order, (0.5,))[~above]
        table[:, value] = 3 * s + 1 + zone
    out = np.zeros(lung_labels.shape, np.uint8)
    for k in rows:
        out[k] = table[k][lung_labels[k]]
    return RegionMap(out, ZONES, "thirds" if carina is None else "carina", carina)


def lobe_regions(lobe_labels: npt.NDArray[np.uint8],
                 lung_labels: npt.NDArray[np.uint8]) -> RegionMap:
    """Regions from a model's lobe labels (1-5 = :data:`LOBES`), limited to the lung mask.

    Lung voxels without a lobe (or with a lobe of the other side) get the nearest lobe of their
    own lung; lobe voxels outside the lung mask are dropped.

    Parameters
    ----------
    lobe_labels:
        ``uint8`` labels 0-5 on the source grid.
    lung_labels:
        0 background, 1 right lung, 2 left lung.

    Returns
    -------
    RegionMap
    """
    out = np.zeros(lung_labels.shape, np.uint8)
    for value, lobes in ((LUNG_RIGHT, (1, 2, 3)), (LUNG_LEFT, (4, 5))):
        lung = lung_labels == value
        if not lung.any():
            continue
        own = lung & np.isin(lobe_labels, lobes)
        if not own.any():
            # the model found no lobe of this lung: its upper lobe takes it all
            out[lung] = lobes[0]
            continue
        out[own] = lobe_labels[own]
        missing = lung & ~own
        if missing.any():
            _, idx = ndimage.distance_transform_edt(~own, return_indices=True)
            nearest = lobe_labels[tuple(i[missing] for i in idx)]
            out[missing] = nearest
    return RegionMap(out, LOBES, "model-lobes")
