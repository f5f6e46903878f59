"""Painting real lesion shapes into a host CT, and the patient split of the real hosts."""

from __future__ import annotations

import numpy as np

from lungnode.training.lesions import Lesion, LesionBank
from lungnode.training.painting import PaintOptions, paint_lesions, placement_weights
from lungnode.training.realcases import HOSTS


def host() -> tuple[np.ndarray, np.ndarray]:
    """Two ellipsoid lungs (-850 HU) with a few vessels (+40 HU) in a soft-tissue body."""
    n, h, w = 40, 120, 160
    k, r, c = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    hu = np.full((n, h, w), 40, np.int16)
    right = ((r - 60) / 45.0) ** 2 + ((c - 45) / 30.0) ** 2 + ((k - 20) / 19.0) ** 2 < 1
    left = ((r - 60) / 45.0) ** 2 + ((c - 115) / 30.0) ** 2 + ((k - 20) / 19.0) ** 2 < 1
    rng = np.random.default_rng(0)
    hu[right | left] = (-850 + rng.normal(0, 15, (right | left).sum())).astype(np.int16)
    vessels = ((r % 17 == 0) | (c % 19 == 0)) & (right | left)
    hu[vessels] = 40
    labels = np.zeros(hu.shape, np.uint8)
    labels[right] = 1
    labels[left] = 2
    return hu, labels


def bank() -> LesionBank:
    z, y, x = np.meshgrid(np.arange(4), np.arange(14), np.arange(14), indexing="ij")
    blob = ((y - 7) ** 2 + (x - 7) ** 2 + ((z - 1.5) * 3) ** 2) < 36
    return LesionBank([Lesion(blob, (8.0, 0.8, 0.8), "0001"), Lesion(blob[:, :10], (8.0, 0.8, 0.8), "0002")])


def test_painted_lesions_lie_in_both_lungs_and_look_like_infiltrate() -> None:
    hu, labels = host()
    spacing = (2.5, 2.0, 2.0)
    opts = PaintOptions(lesions=(4, 6), kind_weights=(1.0, 0.0, 0.0, 0.0))  # ground glass only
    p = paint_lesions(hu, labels, spacing, bank(), np.random.default_rng(1), 1.0, 1.0, opts)
    assert p.infiltrate.any() and len(p.kinds) >= 2
    assert not (p.infiltrate & (labels == 0)).any(), "infiltrate only inside the lungs"
    assert (p.infiltrate & (labels == 1)).any() and (p.infiltrate & (labels == 2)).any()
    parenchyma = p.infiltrate & (hu < -700)
    raised = p.hu[parenchyma].astype(float) - hu[parenchyma]
    assert np.median(raised) > 100, "ground glass raises the parenchyma"
    vessel = p.infiltrate & (hu > 0)
    if vessel.any():  # vessels inside ground glass stay as dense as before
        assert np.abs(p.hu[vessel].astype(float) - hu[vessel]).mean() < 60
    assert (p.hu[labels == 0] == hu[labels == 0]).all(), "nothing painted outside the lungs"
    # consolidation replaces the tissue with -100...+50 HU
    opts_c = PaintOptions(lesions=(3, 3), kind_weights=(0.0, 1.0, 0.0, 0.0))
    q = paint_lesions(hu, labels, spacing, bank(), np.random.default_rng(2), 1.0, 1.0, opts_c)
    core = q.infiltrate & (hu < -700)
    assert core.any() and np.median(q.hu[core]) > -250


def test_placement_prefers_periphery_and_bases() -> None:
    _, labels = host()
    w = placement_weights(labels > 0, (2.5, 2.0, 2.0), superior=1.0, posterior=1.0)
    lung = labels > 0
    assert w[~lung].max() == 0
    assert w[10, 60, 20] > w[20, 60, 45]  # near the border vs the lung core
    assert w[8].sum() > w[32].sum()  # lower slices (feet, superior=+1) heavier than upper


def test_hosts_split_by_patient() -> None:
    train = {h.patient for h in HOSTS if h.split == "train"}
    held = {h.patient for h in HOSTS if h.split == "eval"}
    assert not train & held and len(held) >= 2
    assert {"LIDC-IDRI-0001", "CMB-CRC-MSB-01068", "Lung_Dx-A0002"} <= held
