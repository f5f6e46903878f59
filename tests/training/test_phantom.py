"""Phantom generator and lesion bank: anatomy, HU ranges, exact masks, real lesion shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungnode.training.lesions import LesionBank
from lungnode.training.phantom import make_phantom
from tests.training.conftest import TINY


def test_lesion_bank_round_trip_and_study_split(bank: LesionBank, tmp_path: Path) -> None:
    assert len(bank.studies) == 4 and len(bank) >= 4
    f = tmp_path / "bank.npz"
    bank.save(f)
    back = LesionBank.load(f)
    assert len(back) == len(bank)
    pairs = zip(bank.lesions, back.lesions, strict=True)
    assert all(np.array_equal(a.mask, b.mask) and a.study == b.study for a, b in pairs)
    train, held = bank.split(0.25)
    assert set(train.studies).isdisjoint(held.studies)
    assert len(held.studies) == 1 and len(train) + len(held) == len(bank)


def test_phantom_anatomy_hu_and_masks(bank: LesionBank) -> None:
    p = make_phantom(np.random.default_rng(3), bank, TINY)
    assert p.hu.shape == TINY.shape and p.hu.dtype == np.int16
    lung_frac = p.lung.mean()
    assert 0.05 < lung_frac < 0.45
    assert p.infiltrate.any() and not (p.infiltrate & ~p.lung).any()
    lung_only = p.lung & ~p.infiltrate
    assert float(np.median(p.hu[lung_only])) < -700
    assert -800 < float(np.median(p.hu[p.infiltrate])) < 100  # ground glass / consolidation
    assert float(p.hu[0, 0, 0]) < -900  # air outside the body
    assert p.hu.max() > 250  # ribs / spine
    assert set(p.lesion_studies) <= set(bank.studies)


def test_phantom_is_deterministic_and_varies(bank: LesionBank) -> None:
    a = make_phantom(np.random.default_rng(11), bank, TINY)
    b = make_phantom(np.random.default_rng(11), bank, TINY)
    c = make_phantom(np.random.default_rng(12), bank, TINY)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.infiltrate, b.infiltrate)
    assert not np.array_equal(a.hu, c.hu)


def test_phantom_without_bank_has_no_lesions() -> None:
    p = make_phantom(np.random.default_rng(0), None, TINY)
    assert not p.infiltrate.any() and p.lung.any()
