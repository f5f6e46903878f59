"""Fixtures of the training tests: a small real lesion bank and tiny phantoms (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungnode.training.cases import Case, phantom_cases
from lungnode.training.lesions import LesionBank, build_lesion_bank
from lungnode.training.phantom import PhantomOptions

TINY = PhantomOptions(shape=(24, 64, 64), spacing_mm=(6.0, 5.0, 5.0), max_lesions=4, empty_fraction=0.0,
                      lesion_scale=(1.5, 2.5))


@pytest.fixture(scope="session")
def mosmed_masks(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real MosMed masks (two studies' worth per split) copied into a temporary folder."""
    src = shared_data / "masks" / "mosmed"
    files = sorted(src.glob("study_*_mask.nii.gz"))[:4]
    if len(files) < 4:
        pytest.skip(f"MosMed masks not found in {src}")
    dst = tmp_path_factory.mktemp("mosmed") / "masks"
    dst.mkdir()
    for f in files:
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="session")
def bank(mosmed_masks: Path) -> LesionBank:
    """Lesion bank from the four real masks."""
    return build_lesion_bank(mosmed_masks)


@pytest.fixture(scope="session")
def tiny_cases(bank: LesionBank) -> list[Case]:
    """Three tiny phantoms with lesions (coarse spacing: about 0.1 s each)."""
    return phantom_cases(3, bank, TINY, seed0=7, workers=1)


def assert_same_case(a: Case, b: Case) -> None:
    """Image, masks and spacing equal."""
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.infiltrate, b.infiltrate)
    assert (a.lung is None) == (b.lung is None)
    if a.lung is not None and b.lung is not None:
        assert np.array_equal(a.lung, b.lung)
    assert np.allclose(a.spacing_mm, b.spacing_mm, rtol=1e-5)
