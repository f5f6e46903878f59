"""A packed training set (hosts on the model grid, lesion bank) is enough to make the cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungnode.training.carry import pack_training_set
from lungnode.training.realcases import (
    HOSTS,
    HostVolume,
    cached_host,
    host_cache_path,
    real_cases,
    save_host,
)
from lungnode.training.recipe import load_recipe
from tests.training.test_painting import bank, host

SPACING = (2.5, 2.0, 2.0)


def test_cases_are_painted_from_cached_hosts_without_the_dicom_folders(tmp_path: Path) -> None:
    hu, labels = host()
    cache = tmp_path / "cases"
    train_hosts = [h for h in HOSTS if h.split == "train"]
    for h in train_hosts[:2]:
        path = host_cache_path(cache, h, SPACING)
        assert path is not None
        save_host(HostVolume(h.folder, hu, labels, SPACING, 1.0, 1.0), path)
    missing_root = tmp_path / "no-dicom-here"
    again = cached_host(missing_root, train_hosts[0], SPACING, cache)
    assert again is not None and (again.hu == hu).all() and (again.lung_labels == labels).all()
    assert cached_host(missing_root, train_hosts[2], SPACING, cache) is None
    logged: list[str] = []
    train, val = real_cases(missing_root, SPACING, bank(), 0.5, 2, 1, cache, logged.append)
    assert len(train) == 2 * 3 and len(val) == 2  # 2 cached hosts: unmodified + 2 painted, 1 validation each
    assert not train[0].infiltrate.any() and train[1].infiltrate.any()
    assert sum("missing" in line for line in logged) == len(train_hosts) - 2


def test_pack_refuses_a_recipe_without_carry_paths() -> None:
    with pytest.raises(ValueError, match="cache_dir"):
        pack_training_set(load_recipe("ct"), None)


def test_gpu_recipe_reads_only_the_packed_folder() -> None:
    r = load_recipe("ct-gpu")
    carried = [r.data.cache_dir, r.data.lesion_bank, r.train.pretrained]
    assert all(p.startswith(".devcarry/") for p in carried)
    assert r.model.encoder == "ct_resnet152" and r.train.pretrained_kind == "ct"
    assert np.isclose(r.model.hu_min, -1000.0) and np.isclose(r.model.hu_max, 1000.0)
