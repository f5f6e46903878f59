"""Anatomy rules of the lung mask on a real whole-body CT (chest, abdomen, pelvis with bowel gas).

The series is ``../shared/data/ct/real-chest/tcga-thca-de-a4ma-wholebody`` (TCGA-THCA, CT of a
PET/CT, 269 x 5 mm slices at 2.5 mm steps from the skull base to the thighs).

Diaphragm level used by the checks, computed here independently of the module: the internal air
(HU < -400, not connected to the image border in its slice) is labelled in 3D; the lungs are the
components holding at least 20 % of the largest one's volume and reaching its upper half (the
lungs are joined through the airways, so in practice this is the one largest component); the lung
base is their most caudal slice (the deepest point of the costophrenic recesses). Gas in the
stomach and bowel lies in other, caudal components.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lungnode.inference.dicom_io import find_series_files, read_series
from lungnode.inference.geometry import GeometryPolicy
from lungnode.inference.lungmask import anatomical_lung_mask, superior_sign, threshold_lungs
from lungnode.inference.types import LUNG_LEFT, LUNG_RIGHT, SeriesVolume


@pytest.fixture(scope="module")
def wholebody(shared_data: Path) -> SeriesVolume:
    folder = shared_data / "ct" / "real-chest" / "tcga-thca-de-a4ma-wholebody"
    if not folder.is_dir():
        pytest.skip(f"whole-body CT not found at {folder}")
    return read_series(find_series_files(folder), GeometryPolicy(), False)


def internal_air(hu: np.ndarray) -> np.ndarray:
    air = hu < -400
    for k in range(air.shape[0]):
        lab, n = ndimage.label(air[k])
        if n:
            border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
            air[k][np.isin(lab, border[border > 0])] = False
    return air


def lung_base_height(vol: SeriesVolume, air: np.ndarray) -> tuple[float, np.ndarray]:
    """Height (mm, growing towards the head) of the lung base, and each slice's height."""
    height = vol.slice_positions() * superior_sign(vol)
    lab, _ = ndimage.label(air[:, ::2, ::2])
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    first = int(sizes.argmax())
    z1 = np.nonzero((lab == first).any(axis=(1, 2)))[0]
    mid = (height[z1].max() + height[z1].min()) / 2
    base = height[z1].min()
    for c in np.nonzero(sizes >= 0.2 * sizes[first])[0]:
        zc = np.nonzero((lab == c).any(axis=(1, 2)))[0]
        if height[zc].max() >= mid:
            base = min(base, height[zc].min())
    return float(base), height


def ml(vol: SeriesVolume, mask: np.ndarray) -> float:
    w = vol.slice_thickness_weights() * vol.spacing_mm[1] * vol.spacing_mm[2] / 1000.0
    return float(mask.sum(axis=(1, 2)) @ w)


def test_wholebody_lungs_stop_at_the_diaphragm(wholebody: SeriesVolume) -> None:
    vol = wholebody
    assert superior_sign(vol) != 0
    air = internal_air(vol.hu)
    base, height = lung_base_height(vol, air)
    below = height < base - 10.0
    gas_below = ml(vol, air & below[:, None, None])
    assert gas_below > 50, "the test needs bowel/stomach gas below the lungs to mean anything"

    ref = threshold_lungs(vol)
    right, left = ml(vol, ref.labels == LUNG_RIGHT), ml(vol, ref.labels == LUNG_LEFT)
    assert 2500 < right + left < 8000, (right, left)
    assert right > left > 800, "both lungs found; the right one is the larger here"
    assert not ref.labels[below].any(), "threshold lung below the diaphragm"
    assert ref.airway.any() and not (ref.airway & (ref.labels > 0)).any()

    # a model that calls every air pocket inside the body lung (bowel and stomach gas, trachea)
    greedy = air.copy()
    labels = anatomical_lung_mask(greedy, ref, vol)
    assert not labels[below].any(), "model lung below the diaphragm survived"
    assert not (labels[ref.airway] > 0).any(), "trachea/main bronchi counted as lung"
    kept = ml(vol, labels > 0)
    assert abs(kept - (right + left)) < 0.1 * (right + left), (kept, right + left)
    # left/right by patient coordinates: the right lung lies at lower patient x (LPS)
    cols_r = np.nonzero(labels == LUNG_RIGHT)[2].mean()
    cols_l = np.nonzero(labels == LUNG_LEFT)[2].mean()
    assert (cols_r < cols_l) == (vol.direction[0][0] > 0)
