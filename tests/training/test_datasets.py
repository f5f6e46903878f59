"""Every loader on small files made here in that dataset's layout; splits and caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungnode.training.cases import Case
from lungnode.training.datasets import (
    load_dataset,
    load_dicom_seg,
    split_cases,
    write_case_nifti,
    write_nifti,
)
from lungnode.training.recipe import load_recipe
from lungnode.training.ricord import fill_polygon, prepare_ricord
from tests.training.conftest import assert_same_case


@pytest.mark.parametrize("layout", ["covid19-ct-seg", "mosmed", "nifti"])
def test_layout_round_trip(tiny_cases: list[Case], tmp_path: Path, layout: str) -> None:
    for c in tiny_cases[:2]:
        write_case_nifti(c, tmp_path, layout)
    back = load_dataset(layout, tmp_path)
    assert len(back) == 2
    for a, b in zip(tiny_cases[:2], back, strict=False):
        if layout == "mosmed":  # no lung masks in MosMed
            assert b.lung is None and b.dataset == "mosmed"
            assert np.array_equal(a.hu, b.hu) and np.array_equal(a.infiltrate, b.infiltrate)
        else:
            assert_same_case(a, b)


def test_covid19_ct_seg_names_and_radiopaedia_intensity(tmp_path: Path) -> None:
    img = np.full((4, 8, 8), 204, np.int16)  # radiopaedia volumes are stored windowed to 0-255
    mask = np.zeros((4, 8, 8), np.uint8)
    mask[1, 2:4, 2:4] = 1
    lung = np.zeros((4, 8, 8), np.uint8)
    lung[:, 1:7, 1:4], lung[:, 1:7, 4:7] = 1, 2
    for name in ("coronacases_001", "radiopaedia_4_85506_1"):
        write_nifti(tmp_path / "COVID-19-CT-Seg_20cases" / f"{name}.nii.gz", img, (5.0, 0.7, 0.7))
        write_nifti(tmp_path / "Infection_Mask" / f"{name}.nii.gz", mask, (5.0, 0.7, 0.7))
        write_nifti(tmp_path / "Lung_Mask" / f"{name}.nii.gz", lung, (5.0, 0.7, 0.7))
    cases = {c.case_id: c for c in load_dataset("covid19-ct-seg", tmp_path)}
    assert cases["coronacases_001"].dataset == "coronacases"
    assert cases["radiopaedia_4_85506_1"].dataset == "radiopaedia"
    assert int(cases["coronacases_001"].hu[0, 0, 0]) == 204
    assert int(cases["radiopaedia_4_85506_1"].hu[0, 0, 0]) == -50  # 204 / 255 * 1500 - 1250
    lung_mask = cases["coronacases_001"].lung
    assert lung_mask is not None and int(lung_mask.sum()) == 4 * 6 * 6
    assert int(cases["coronacases_001"].infiltrate.sum()) == 4
    assert cases["coronacases_001"].spacing_mm == pytest.approx((5.0, 0.7, 0.7))


def test_dicom_seg_matched_by_sop_uid(shared_data: Path) -> None:
    cases = load_dicom_seg(shared_data / "ct" / "ct-3-slices-with-seg", infiltrate_labels="liver")
    assert len(cases) == 1
    c = cases[0]
    assert c.hu.shape[0] == 3 and c.infiltrate.shape == c.hu.shape
    assert c.infiltrate.any() and c.lung is None
    # the liver mask must lie on soft tissue, not air
    assert float(np.median(c.hu[c.infiltrate])) > -100


def test_fill_polygon_hand_counted() -> None:
    sq = fill_polygon([[2, 2], [6, 2], [6, 6], [2, 6]], (10, 10))
    assert int(sq.sum()) == 16 and sq[2:6, 2:6].all()
    tri = fill_polygon([[0, 0], [8, 0], [0, 8]], (10, 10))
    assert tri[1, 1] and not tri[7, 7]


def test_prepare_ricord_from_mdai_json(shared_data: Path, tmp_path: Path) -> None:
    dicom = shared_data / "ct" / "ct-3-slices-with-seg"
    files = sorted(dicom.glob("0*.dcm"))
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ann = {"labelGroups": [{"labels": [{"id": "L_1", "name": "Infectious opacity"},
                                       {"id": "L_2", "name": "Other"}]}],
           "datasets": [{"annotations": [
               {"StudyInstanceUID": ds[0].StudyInstanceUID, "SeriesInstanceUID": ds[0].SeriesInstanceUID,
                "SOPInstanceUID": ds[1].SOPInstanceUID, "labelId": "L_1",
                "data": {"vertices": [[10, 10], [20, 10], [20, 20], [10, 20]]}},
               {"StudyInstanceUID": ds[0].StudyInstanceUID, "SeriesInstanceUID": ds[0].SeriesInstanceUID,
                "SOPInstanceUID": ds[2].SOPInstanceUID, "labelId": "L_2",
                "data": {"foreground": [[[30, 30], [40, 30], [40, 40], [30, 40]]]}}]}]}
    jf = tmp_path / "mdai.json"
    jf.write_text(json.dumps(ann))
    n = prepare_ricord(dicom, jf, tmp_path / "out", labels=["Infectious opacity"])
    assert n == 1
    cases = load_dataset("ricord-prepared", tmp_path / "out")
    assert len(cases) == 1 and cases[0].dataset == "ricord"
    inf = cases[0].infiltrate
    assert int(inf.sum()) == 100  # one 10x10 square on one slice; the "Other" label is excluded
    assert int(inf.sum(axis=(1, 2)).astype(bool).sum()) == 1


def test_split_written_once_and_cache_used(tiny_cases: list[Case], tmp_path: Path) -> None:
    for c in tiny_cases:
        write_case_nifti(c, tmp_path / "ds", "nifti")
    split = tmp_path / "split.json"
    over = {"data.source": "datasets", "data.datasets": [{"kind": "nifti", "root": str(tmp_path / "ds")}],
            "data.split_file": str(split), "data.cache_dir": str(tmp_path / "cache"),
            "data.val_fraction": 0.34, "data.spacing_mm": [6.0, 10.0, 10.0]}
    recipe = load_recipe("demo", over)
    train, val = split_cases(recipe, log=lambda s: None)
    assert len(train) == 2 and len(val) == 1
    assert train[0].hu.shape[1] == 32  # resampled from 5 mm to 10 mm in-plane
    saved = json.loads(split.read_text())
    assert sorted(saved["train"] + saved["val"]) == sorted(f"ds/{c.case_id}" for c in tiny_cases)
    assert any((tmp_path / "cache").glob("*.npz"))
    train2, val2 = split_cases(recipe, log=lambda s: None)  # from the cache and the split file
    assert [c.case_id for c in val2] == [c.case_id for c in val]
    assert np.array_equal(train2[0].hu, train[0].hu)
