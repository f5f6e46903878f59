"""Volumes and percentages reported for a series: lung, infiltrate, ground glass, consolidation.

This module owns the arithmetic of the reported figures, per region (right lung, left lung, both):

* lung volume (mL) = lung voxels x voxel volume;
* infiltrate volume (mL) = infiltrate voxels inside that lung x voxel volume;
* percent of lung involved = 100 x infiltrate / lung (property of
  :class:`~lungnode.inference.types.RegionMeasurement`);
* ground-glass opacity (mL): infiltrate voxels with ``GGO_MIN_HU <= HU < CONSOLIDATION_MIN_HU``
  (-750 to -300 HU);
* consolidation (mL): infiltrate voxels with ``HU >= CONSOLIDATION_MIN_HU`` (-300 HU).

Infiltrate voxels below -750 HU count in the infiltrate volume but in neither sub-class, so
``ground_glass_ml + consolidation_ml <= infiltrate_ml``. Voxel volume is ``dz * dy * dx``; for an
accepted irregular series each slice uses its own thickness (half the distance to each
neighbour).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from lungnode.inference.types import (
    LUNG_LEFT,
    LUNG_RIGHT,
    Measurements,
    RegionMeasurement,
    SeriesVolume,
)

__all__ = ["CONSOLIDATION_MIN_HU", "GGO_MIN_HU", "measure", "measure_volume"]

#: Lower HU bound of ground-glass opacity inside the infiltrate mask.
GGO_MIN_HU = -750.0
#: HU from which infiltrate counts as consolidation (upper bound of ground glass, exclusive).
CONSOLIDATION_MIN_HU = -300.0


def measure(
    hu: npt.NDArray[np.floating],
    lung_labels: npt.NDArray[np.uint8],
    infiltrate: npt.NDArray[np.bool_],
    voxel_ml: float | npt.NDArray[np.floating],
    infiltrate_outside_lung_ml: float = 0.0,
) -> Measurements:
    """Compute the reported measurements from masks.

    Parameters
    ----------
    hu:
        HU volume ``(slices, rows, columns)``.
    lung_labels:
        0 background, 1 right lung, 2 left lung.
    infiltrate:
        Infiltrate mask (voxels outside the lungs are ignored).
    voxel_ml:
        Volume of one voxel in mL, or one value per slice (irregular spacing).
    infiltrate_outside_lung_ml:
        Passed through to :class:`Measurements`.

    Returns
    -------
    Measurements
    """
    if not (hu.shape == lung_labels.shape == infiltrate.shape):
        raise ValueError("hu, lung_labels and infiltrate must have the same shape")
    n = hu.shape[0]
    per_slice = np.broadcast_to(np.asarray(voxel_ml, dtype=np.float64), (n,))
    # per-slice voxel counts for each (region, class): 2 regions x 4 quantities
    counts = np.zeros((2, 4, n), dtype=np.float64)
    for k in range(n):
        lab = lung_labels[k]
        inf = infiltrate[k]
        h = hu[k]
        ggo = (h >= GGO_MIN_HU) & (h < CONSOLIDATION_MIN_HU)
        cons = h >= CONSOLIDATION_MIN_HU
        for r, value in enumerate((LUNG_RIGHT, LUNG_LEFT)):
            in_region = lab == value
            ri = in_region & inf
            counts[r, 0, k] = np.count_nonzero(in_region)
            counts[r, 1, k] = np.count_nonzero(ri)
            counts[r, 2, k] = np.count_nonzero(ri & ggo)
            counts[r, 3, k] = np.count_nonzero(ri & cons)
    ml = counts @ per_slice  # (2, 4)

    def region(row: npt.NDArray[np.float64]) -> RegionMeasurement:
        return RegionMeasurement(lung_ml=float(row[0]), infiltrate_ml=float(row[1]),
                                 ground_glass_ml=float(row[2]), consolidation_ml=float(row[3]))

    return Measurements(
        right=region(ml[0]),
        left=region(ml[1]),
        both=region(ml[0] + ml[1]),
        infiltrate_outside_lung_ml=float(infiltrate_outside_lung_ml),
    )


def measure_volume(
    volume: SeriesVolume,
    lung_labels: npt.NDArray[np.uint8],
    infiltrate: npt.NDArray[np.bool_],
    infiltrate_outside_lung_ml: float = 0.0,
) -> Measurements:
    """:func:`measure` with the voxel volumes of a :class:`SeriesVolume` (irregular-aware).

    Parameters
    ----------
    volume:
        Series (HU and geometry).
    lung_labels, infiltrate:
        Masks on the source grid.
    infiltrate_outside_lung_ml:
        Passed through.

    Returns
    -------
    Measurements
    """
    _, dr, dc = volume.spacing_mm
    per_slice = volume.slice_thickness_weights() * dr * dc / 1000.0
    return measure(volume.hu, lung_labels, infiltrate, per_slice, infiltrate_outside_lung_ml)
