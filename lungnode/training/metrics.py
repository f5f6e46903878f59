"""Segmentation metrics of the paper's protocol: Dice and normalised surface Dice per patient.

This module owns the metric definitions used by validation and ``training evaluate``:

* :func:`dice_score` — volumetric Dice of two binary masks; both empty counts as 1.0 (a correct
  "no infiltrate"), exactly one empty as 0.0;
* :func:`surface_dice` — normalised surface Dice (NSD) through MONAI's
  ``compute_surface_dice`` with ``use_subvoxels=True`` and the voxel spacing in mm, which equals
  the DeepMind implementation used by Ma et al. and Bressem et al.; tolerances
  :data:`NSD_TOLERANCE_MM` (1 mm lung, 3 mm lesion, as Ma et al.);
* :func:`summarize` — macro average and (population) standard deviation over patients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["NSD_TOLERANCE_MM", "dice_score", "summarize", "surface_dice"]

#: Surface Dice tolerance per structure (Ma et al. 2021, COVID-19-CT-Seg benchmark).
NSD_TOLERANCE_MM: dict[str, float] = {"lung": 1.0, "infiltrate": 3.0}


def dice_score(pred: npt.ArrayLike, gt: npt.ArrayLike) -> float:
    """Dice coefficient ``2|P∩G| / (|P| + |G|)``; 1.0 when both masks are empty."""
    p = np.asarray(pred, bool)
    g = np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {g.shape}")
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def surface_dice(pred: npt.ArrayLike, gt: npt.ArrayLike, spacing_mm: Sequence[float],
                 tolerance_mm: float) -> float:
    """Normalised surface Dice at a tolerance (MONAI, sub-voxel surfaces, spacing in mm).

    Parameters
    ----------
    pred, gt:
        Binary masks ``(D, H, W)``.
    spacing_mm:
        Voxel spacing along the same axes.
    tolerance_mm:
        Surface distance within which a boundary element counts as matched.

    Returns
    -------
    float
        In ``[0, 1]``; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    import torch
    from monai.metrics import compute_surface_dice

    p = np.asarray(pred, bool)
    g = np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {g.shape}")
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0

    def onehot(a: npt.NDArray[np.bool_]) -> torch.Tensor:
        t = torch.from_numpy(a)
        return torch.stack([~t, t])[None].float()

    val = compute_surface_dice(onehot(p), onehot(g), class_thresholds=[float(tolerance_mm)],
                               include_background=False,
                               spacing=[float(s) for s in spacing_mm], use_subvoxels=True)
    return float(val.reshape(-1)[0])


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Macro mean and standard deviation over patients (NaN-free input; empty → NaN)."""
    if not values:
        return float("nan"), float("nan")
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std())
