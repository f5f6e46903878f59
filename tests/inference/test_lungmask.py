"""Threshold lung mask: real chest CT volumes, left/right by patient coordinates, airways, holes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungnode.inference.dicom_io import read_series
from lungnode.inference.lungmask import threshold_lung_mask
from lungnode.inference.types import LUNG_LEFT, LUNG_RIGHT, SeriesVolume

IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def phantom(flip_columns: bool = False) -> tuple[SeriesVolume, dict[str, np.ndarray]]:
    """Chest phantom 40 x 200 x 200 at 2.5 x 1.5 x 1.5 mm: body, two lungs, trachea, lesions."""
    n, h, w = 40, 200, 200
    k, r, c = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    hu = np.full((n, h, w), -1000.0, np.float32)  # outside air
    body = ((r - 100) / 80.0) ** 2 + ((c - 100) / 95.0) ** 2 < 1
    hu[body] = 40.0
    # patient right lung at low patient x = low column (identity orientation)
    right = ((r - 100) / 55.0) ** 2 + ((c - 55) / 30.0) ** 2 + ((k - 20) / 22.0) ** 2 < 1
    left = ((r - 100) / 55.0) ** 2 + ((c - 145) / 30.0) ** 2 + ((k - 20) / 22.0) ** 2 < 1
    hu[right | left] = -850.0
    trachea = ((r - 70) ** 2 + (c - 100) ** 2 < 7**2) & (k >= 28)
    hu[trachea] = -1000.0
    enclosed = ((r - 100) ** 2 + (c - 55) ** 2 + ((k - 20) * 1.6) ** 2) < 10**2  # dense, inside lung
    hu[enclosed] = 30.0
    peripheral = ((r - 100) ** 2 + (c - 27) ** 2 + ((k - 20) * 1.6) ** 2) < 5**2  # touches chest wall
    hu[peripheral & right] = 20.0
    spacing = (2.5, 1.5, 1.5)
    origin = (-150.0, -150.0, 0.0)
    direction = IDENTITY
    if flip_columns:  # row direction -x: image left is now patient LEFT
        hu = hu[:, :, ::-1].copy()
        right, left = right[:, :, ::-1], left[:, :, ::-1]
        trachea, enclosed = trachea[:, :, ::-1], enclosed[:, :, ::-1]
        origin = (150.0, -150.0, 0.0)
        direction = ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
    vol = SeriesVolume(hu=hu, spacing_mm=spacing, origin_mm=origin, direction=direction,
                       source_files=tuple(Path(f"{i}.dcm") for i in range(n)),
                       source_frames=(1,) * n, sop_instance_uids=("",) * n)
    return vol, {"right": right, "left": left, "trachea": trachea, "enclosed": enclosed}


@pytest.mark.parametrize("flip", [False, True])
def test_phantom_left_right_airways_and_holes(flip: bool) -> None:
    vol, truth = phantom(flip)
    lab = threshold_lung_mask(vol)
    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return float(2 * np.sum(a & b) / (a.sum() + b.sum()))

    dice_r = dice(lab == LUNG_RIGHT, truth["right"])
    dice_l = dice(lab == LUNG_LEFT, truth["left"])
    assert dice_r > 0.95 and dice_l > 0.95
    assert not lab[truth["trachea"]].any(), "trachea must not count as lung"
    assert (lab[truth["enclosed"]] == LUNG_RIGHT).all(), "enclosed consolidation stays in the lung"


def test_real_chest_ct_lungs(chest_ct_dir: Path) -> None:
    vol = read_series(sorted(chest_ct_dir.glob("*.dcm")))
    lab = threshold_lung_mask(vol)
    right_ml = np.count_nonzero(lab == LUNG_RIGHT) * vol.voxel_volume_ml
    left_ml = np.count_nonzero(lab == LUNG_LEFT) * vol.voxel_volume_ml
    # 30 slices x 8 mm = 240 mm cover base to apex of an adult chest: each lung 0.5-4 L
    # (measured 1.13 L right, with a right hilar mass, and 1.60 L left)
    assert 500 < right_ml < 4000 and 500 < left_ml < 4000
    # patient right (LPS -x) is image left for this HFS series with row direction +x
    cols_r = np.nonzero(lab == LUNG_RIGHT)[2].mean()
    cols_l = np.nonzero(lab == LUNG_LEFT)[2].mean()
    assert cols_r < 256 < cols_l
    # lung voxels are mostly aerated (mean HU well below soft tissue)
    assert vol.hu[lab > 0].mean() < -600
    # the trachea in the upper slices is excluded: the darkest central small component
    top = vol.hu[-4]
    centre = top[200:330, 226:286]
    assert not (lab[-4, 200:330, 226:286][centre < -950]).any()


def test_drop_stray_components_keeps_lungs_and_removes_outside_pieces() -> None:
    from lungnode.inference.lungmask import body_mask, drop_stray_components

    hu = np.full((20, 64, 64), -1000.0, np.float32)
    hu[:, 5:50, 2:62] = 40.0                # body
    hu[:, 56:62, 10:54] = 300.0             # table, detached from the body
    hu[:, 58:60, 20:30] = -1000.0           # air pocket inside the table
    mask = np.zeros(hu.shape, bool)
    mask[2:18, 10:40, 5:28] = True           # right lung
    mask[2:18, 10:40, 36:60] = True          # left lung
    mask[8:10, 40:44, 20:24] = True          # attached to the right lung: kept
    mask[4:16, 58:60, 20:30] = True          # "lung" in the table's air pocket: dropped
    mask[5:6, 20:21, 31:32] = True           # tiny speck inside the body: dropped
    body = body_mask(hu)
    assert body[10, 20, 30] and not body[10, 58, 25]
    out = drop_stray_components(mask, body)
    assert out[2:18, 10:40, 5:28].all() and out[2:18, 10:40, 36:60].all()
    assert out[8:10, 40:44, 20:24].all()
    assert not out[4:16, 58:60, 20:30].any()
    assert not out[5, 20, 31]
    assert mask[4:16, 58:60, 20:30].all()    # input untouched
