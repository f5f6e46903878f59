"""Measurement arithmetic on hand-made arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungnode.inference.measurements import measure, measure_volume
from lungnode.inference.types import SeriesVolume


def test_volumes_and_percentages() -> None:
    hu = np.full((2, 4, 4), -850.0, np.float32)
    lab = np.zeros((2, 4, 4), np.uint8)
    lab[:, :, :2] = 1  # right: 16 voxels
    lab[:, :, 2:] = 2  # left: 16 voxels
    inf = np.zeros((2, 4, 4), bool)
    inf[0, 0, 0] = True
    hu[0, 0, 0] = -500  # GGO
    inf[0, 1, 0] = True
    hu[0, 1, 0] = 20  # consolidation
    inf[1, 0, 3] = True
    hu[1, 0, 3] = -800  # infiltrate but below the GGO range
    inf[1, 0, 3] = True
    m = measure(hu, lab, inf, voxel_ml=0.5, infiltrate_outside_lung_ml=1.25)
    assert m.right.lung_ml == 8.0 and m.left.lung_ml == 8.0 and m.both.lung_ml == 16.0
    assert m.right.infiltrate_ml == 1.0 and m.left.infiltrate_ml == 0.5 and m.both.infiltrate_ml == 1.5
    assert m.right.ground_glass_ml == 0.5 and m.right.consolidation_ml == 0.5
    assert m.left.ground_glass_ml == 0.0 and m.left.consolidation_ml == 0.0
    assert m.right.percent_involved == pytest.approx(12.5)
    assert m.both.percent_involved == pytest.approx(100 * 1.5 / 16)
    assert m.infiltrate_outside_lung_ml == 1.25


def test_threshold_boundaries() -> None:
    hu = np.array([[[-750.0, -300.0, -300.1, -750.1]]], np.float32)
    lab = np.ones_like(hu, np.uint8)
    m = measure(hu, lab, np.ones_like(hu, bool), 1.0)
    assert m.right.ground_glass_ml == 2.0  # -750 and -300.1
    assert m.right.consolidation_ml == 1.0  # -300
    assert m.right.infiltrate_ml == 4.0


def test_infiltrate_outside_lungs_is_ignored_and_empty_lung_is_zero_percent() -> None:
    hu = np.zeros((1, 2, 2), np.float32)
    lab = np.zeros((1, 2, 2), np.uint8)
    m = measure(hu, lab, np.ones((1, 2, 2), bool), 1.0)
    assert m.both.infiltrate_ml == 0.0 and m.both.percent_involved == 0.0


def test_irregular_slices_use_their_thickness() -> None:
    hu = np.zeros((3, 2, 2), np.float32)
    vol = SeriesVolume(hu=hu, spacing_mm=(2.0, 1.0, 1.0), origin_mm=(0, 0, 0),
                       direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                       source_files=(Path("a"),) * 3, source_frames=(1, 1, 1), sop_instance_uids=("",) * 3,
                       slice_positions_mm=(0.0, 2.0, 6.0))
    lab = np.ones((3, 2, 2), np.uint8)
    m = measure_volume(vol, lab, np.zeros((3, 2, 2), bool))
    # thicknesses 2, 3, 4 mm -> (2 + 3 + 4) * 4 voxels * 1 mm^2 = 36 mm^3
    assert m.right.lung_ml == pytest.approx(0.036)
