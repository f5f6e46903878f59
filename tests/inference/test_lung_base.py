"""The lung base rule: outside-lung infiltrate is counted (and lung kept) down to the lung base only."""

from __future__ import annotations

import numpy as np
import pytest

from lungnode.inference.lungmask import lung_base_cut, superior_sign
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
