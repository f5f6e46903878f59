"""Where outside-lung infiltrate counts: down to the lung base only, and inside the body only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lungnode.inference.lungmask import lung_base_cut, superior_sign, threshold_lungs
from tests.inference.test_lungmask import phantom


@pytest.mark.parametrize("flip", [False, True])
def test_slices_more_than_the_margin_below_the_base_are_cleared(flip: bool) -> None:
    vol, _ = phantom(flip_columns=flip)
    height = vol.slice_positions() * superior_sign(vol)  # grows towards the head
    order = np.argsort(height)  # caudal first
    reference = np.zeros(vol.hu.shape, bool)
    reference[order[20:], 90:110, 40:70] = True  # lungs end at the 21st slice from the feet
    base = height[order[20]]
    mask = np.ones(vol.hu.shape, bool)
    cleared = lung_base_cut(mask, reference, vol, margin_mm=10.0)
    below = height < base - 10.0
    assert below.sum() == 16  # 2.5 mm slices: the 4 slices within 10 mm of the base are kept
    assert not mask[below].any()
    assert mask[~below].all()
    assert cleared == int(below.sum()) * vol.hu.shape[1] * vol.hu.shape[2]


def test_no_reference_lungs_clears_nothing() -> None:
    vol, _ = phantom()
    mask = np.ones(vol.hu.shape, bool)
    assert lung_base_cut(mask, np.zeros_like(mask), vol) == 0
    assert mask.all()


def test_body_excludes_air_table_and_cushions() -> None:
    """A foam cushion (about -650 HU, like ground glass) under the patient is outside the body, so
    infiltrate predicted in it is not counted as lung the mask missed."""
    vol, truth = phantom()
    hu = vol.hu.copy()
    hu[:, 186:198, 60:140] = -650.0  # cushion below the body (rows grow posteriorly)
    vol = dataclasses.replace(vol, hu=hu)
    body = threshold_lungs(vol).body
    assert body[:, 100, 100].all() and body[truth["right"]].mean() > 0.99
    assert not body[:, 190:196, 70:130].any(), "the cushion is not body"
    assert not body[:, 2, 2].any(), "outside air is not body"
