"""Issue 20, item 6: a series whose slices carry different Frame of Reference UIDs (as the public
LIDC-IDRI-0314 does, one per slice) is refused before the model runs, with a reason an admin
understands, instead of failing later inside highdicom with a raw ValueError."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from lungnode.inference.dicom_io import read_series
from lungnode.inference.geometry import GeometryError, check_slice_geometry


def _stack(n: int) -> tuple[list[list[float]], list[list[float]], list[tuple[int, int]]]:
    return ([[0.0, 0.0, 2.0 * i] for i in range(n)], [[1.0, 0, 0, 0, 1.0, 0]] * n, [(4, 4)] * n)


def test_one_frame_of_reference_per_series() -> None:
    positions, orientations, sizes = _stack(12)
    same = ["1.2.3"] * 12
    assert check_slice_geometry(positions, orientations, sizes, frames_of_reference=same).num_slices == 12
    # Slices without the UID are not counted against the others.
    assert check_slice_geometry(positions, orientations, sizes,
                                frames_of_reference=["1.2.3"] * 11 + [None]).num_slices == 12
    mixed = ["1.2.3"] * 6 + ["1.2.4"] * 6
    with pytest.raises(GeometryError, match=r"2 different Frames of Reference \(slice 1 and slice 7 "
                                            r"differ\)"):
        check_slice_geometry(positions, orientations, sizes, frames_of_reference=mixed)


def test_per_slice_frames_of_reference_refused_when_the_series_is_read(chest_ct_dir: Path,
                                                                       tmp_path: Path) -> None:
    """The real 30-slice series with a new Frame of Reference UID written into every slice: the
    positions still line up, but the series is refused, naming two slices that differ."""
    files = []
    for path in sorted(chest_ct_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = generate_uid()
        files.append(tmp_path / path.name)
        ds.save_as(files[-1], enforce_file_format=True)
    with pytest.raises(GeometryError) as caught:
        read_series(files)
    reason = caught.value.reason
    assert reason.startswith("the slices belong to 30 different Frames of Reference (instance ")
    assert "cannot be stacked into one volume" in reason and "Error" not in reason
    # The unchanged series reads.
    volume = read_series(sorted(chest_ct_dir.glob("*.dcm")))
    assert volume.hu.shape[0] == 30
