"""Dice and normalised surface Dice against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from lungnode.training.metrics import NSD_TOLERANCE_MM, dice_score, summarize, surface_dice


def _cube() -> np.ndarray:
    g = np.zeros((20, 20, 20), bool)
    g[5:10, 5:10, 5:10] = True
    return g


def test_dice_hand_computed() -> None:
    g = _cube()
    p = g.copy()
    p[12:17, 12:17, 12:17] = True  # same-size extra blob: 2*125 / (250 + 125)
    assert dice_score(p, g) == pytest.approx(2 / 3)
    half = g.copy()
    half[5:10, 5:10, 5:7] = False  # 75 of 125 voxels: 2*75 / (75 + 125)
    assert dice_score(half, g) == pytest.approx(0.75)
    assert dice_score(np.zeros_like(g), np.zeros_like(g)) == 1.0
    assert dice_score(np.zeros_like(g), g) == 0.0


def test_surface_dice_hand_computed() -> None:
    g = _cube()
    assert surface_dice(g, g, (2.0, 1.0, 1.0), 1.0) == pytest.approx(1.0)
    p = g.copy()
    p[12:17, 12:17, 12:17] = True
    # the extra cube's surface (as large as the true one) is unmatched: (A + A) / (A + 2A)
    assert surface_dice(p, g, (1.0, 1.0, 1.0), 1.0) == pytest.approx(2 / 3, abs=1e-4)
    shifted = np.roll(g, 1, axis=2)  # one voxel (1 mm) off: within 1 mm everywhere
    assert surface_dice(shifted, g, (1.0, 1.0, 1.0), 1.0) == pytest.approx(1.0)
    assert surface_dice(shifted, g, (1.0, 1.0, 1.0), 0.1) < 0.9  # not within 0.1 mm
    far = np.roll(g, 8, axis=0)
    assert surface_dice(far, g, (1.0, 1.0, 1.0), 1.0) == pytest.approx(0.0)  # faces 3 mm apart
    assert surface_dice(np.zeros_like(g), np.zeros_like(g), (1, 1, 1), 1.0) == 1.0
    assert surface_dice(np.zeros_like(g), g, (1, 1, 1), 1.0) == 0.0


def test_tolerances_and_summary() -> None:
    assert NSD_TOLERANCE_MM == {"lung": 1.0, "infiltrate": 3.0}
    mean, sd = summarize([0.5, 1.0])
    assert mean == pytest.approx(0.75) and sd == pytest.approx(0.25)
