"""Geometry validation: on plain tuples and on header-modified copies of the real chest CT."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungnode.inference.dicom_io import read_series
from lungnode.inference.geometry import GeometryError, GeometryPolicy, check_slice_geometry

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _stack(n: int = 12, step: float = 2.5) -> tuple[list, list, list]:
    pos = [(-100.0, -120.0, 50.0 + k * step) for k in range(n)]
    return pos, [AXIAL] * n, [(512, 512)] * n


def test_sorts_along_normal_and_reports_spacing() -> None:
    pos, ori, sizes = _stack()
    shuffled = [pos[i] for i in (5, 0, 11, 3, 1, 2, 4, 6, 7, 8, 9, 10)]
    rep = check_slice_geometry(shuffled, ori, sizes, pixel_spacings=[(0.7, 0.7)] * 12)
    assert [shuffled[i][2] for i in rep.order] == sorted(p[2] for p in pos)
    assert rep.slice_spacing_mm == pytest.approx(2.5) and rep.regular
    assert rep.pixel_spacing_mm == (0.7, 0.7) and rep.origin_mm == (-100.0, -120.0, 50.0)


def test_feet_first_and_coronal_orientations() -> None:
    pos = [(0.0, 10.0 - k * 3.0, 0.0) for k in range(12)]
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal = row x col = (0, 1, 0)
    rep = check_slice_geometry(pos, [coronal] * 12, [(256, 256)] * 12)
    assert rep.positions_along_normal_mm[0] < rep.positions_along_normal_mm[-1]
    assert rep.slice_spacing_mm == pytest.approx(3.0)


def test_spacing_tolerance() -> None:
    pos, ori, sizes = _stack()
    pos[6] = (pos[6][0], pos[6][1], pos[6][2] + 0.02)  # rounding noise: accepted
    check_slice_geometry(pos, ori, sizes)
    pos[6] = (pos[6][0], pos[6][1], pos[6][2] + 0.5)  # irregular
    with pytest.raises(GeometryError, match="irregular slice spacing"):
        check_slice_geometry(pos, ori, sizes)
    rep = check_slice_geometry(pos, ori, sizes, policy=GeometryPolicy(allow_irregular_spacing=True))
    assert not rep.regular and rep.max_spacing_deviation_mm == pytest.approx(0.5, abs=0.03)


def test_duplicates_and_too_few_slices() -> None:
    pos, ori, sizes = _stack()
    pos[3] = pos[4]
    with pytest.raises(GeometryError, match="same position"):
        check_slice_geometry(pos, ori, sizes)
    with pytest.raises(GeometryError, match="at least"):
        check_slice_geometry(*_stack(n=2))


# --- real headers -------------------------------------------------------------------------------
def _edit(folder: Path, names: list[str], fn) -> None:  # type: ignore[no-untyped-def]
    for name in names:
        ds = pydicom.dcmread(folder / name)
        fn(ds)
        ds.save_as(folder / name)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def test_real_series_is_valid(chest_copy: Path) -> None:
    vol = read_series(_files(chest_copy))
    assert vol.hu.shape == (30, 512, 512) and vol.spacing_mm == (8.0, 0.646484375, 0.646484375)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in vol.source_files]
    assert z == sorted(z)


def test_gantry_tilt_rejected(chest_copy: Path) -> None:
    def tilt(ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (312 - z) * math.tan(math.radians(15)), z]

    _edit(chest_copy, [f.name for f in _files(chest_copy)], tilt)
    with pytest.raises(GeometryError, match="gantry tilt"):
        read_series(_files(chest_copy))


def test_missing_slice_rejected(chest_copy: Path) -> None:
    (chest_copy / "1-15.dcm").unlink()
    with pytest.raises(GeometryError, match="missing slice") as exc:
        read_series(_files(chest_copy))
    assert "instance 14" in exc.value.reason and "instance 16" in exc.value.reason


def test_mixed_sizes_rejected(chest_copy: Path) -> None:
    def shrink(ds: pydicom.Dataset) -> None:
        arr = ds.pixel_array[:256, :256].copy()
        ds.Rows, ds.Columns = 256, 256
        ds.PixelData = arr.tobytes()

    _edit(chest_copy, ["1-07.dcm"], shrink)
    with pytest.raises(GeometryError, match="different image sizes"):
        read_series(_files(chest_copy))


def test_mixed_orientation_rejected(chest_copy: Path) -> None:
    def rotate(ds: pydicom.Dataset) -> None:
        a = math.radians(10)
        ds.ImageOrientationPatient = [math.cos(a), math.sin(a), 0, -math.sin(a), math.cos(a), 0]

    _edit(chest_copy, ["1-20.dcm"], rotate)
    with pytest.raises(GeometryError, match="more than one orientation"):
        read_series(_files(chest_copy))


def test_irregular_spacing_rejected_or_resampled_explicitly(chest_copy: Path) -> None:
    def shift(ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 2.0]

    _edit(chest_copy, ["1-10.dcm"], shift)
    with pytest.raises(GeometryError, match="irregular"):
        read_series(_files(chest_copy))
    vol = read_series(_files(chest_copy), GeometryPolicy(allow_irregular_spacing=True))
    z = vol.slice_positions()
    assert len(vol.slice_positions_mm) == 30 and not np.allclose(np.diff(z), 8.0)
    assert vol.slice_thickness_weights().sum() == pytest.approx(30 * 8.0)


def test_enhanced_ct_multiframe(shared_data: Path) -> None:
    vol = read_series([shared_data / "transfer-syntaxes" / "eCT_Supplemental.dcm"],
                      GeometryPolicy(min_slices=2))
    # row (-1, 0, 0) x column (0, 1, 0): the normal is -z, so frame 2 (z = -149) comes first
    assert vol.hu.shape == (2, 512, 512) and vol.source_frames == (2, 1)
    assert vol.spacing_mm[0] == pytest.approx(10.0) and vol.hu.min() >= -1024
    assert vol.direction[0][0] == -1.0  # row direction -x from the shared functional groups
