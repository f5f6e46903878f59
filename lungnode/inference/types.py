"""Plain data types that cross the boundary between ``inference/`` and ``node/``.

``inference/`` produces an :class:`InferenceResult` for one series; ``node/`` turns it into DICOM
SEG, SR and Secondary Capture objects. Nothing here imports torch, pydicom networking or storage, so
both sides (and ``training/``) can depend on it cheaply.

Array conventions
-----------------
All masks are ``numpy`` arrays shaped ``(slices, rows, columns)`` on the **source grid**: index ``k``
along the first axis is the ``k``-th entry of :attr:`SeriesVolume.source_files` (sorted along the
slice normal, increasing position). Rows and columns are the DICOM pixel rows and columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

#: Label values of :attr:`InferenceResult.lung_labels`.
LUNG_BACKGROUND = 0
LUNG_RIGHT = 1
LUNG_LEFT = 2


@dataclass(frozen=True)
class SeriesVolume:
    """A CT series as one validated 3D volume in Hounsfield units.

    Attributes
    ----------
    hu:
        ``float32`` array ``(slices, rows, columns)`` in HU, slices sorted along the slice normal.
    spacing_mm:
        ``(slice, row, column)`` spacing in mm; slice spacing is the distance between centres.
    origin_mm:
        Patient-space position (x, y, z) of the first voxel of the first slice.
    direction:
        3x3 direction cosines, columns are (row direction, column direction, slice normal) as in
        DICOM ImageOrientationPatient plus the normal.
    source_files:
        The file of each slice, same order as axis 0 of ``hu`` (for multi-frame objects the same
        file repeats and ``source_frames`` gives the 1-based frame number).
    source_frames:
        1-based frame number inside ``source_files[k]``; all 1 for single-frame series.
    sop_instance_uids:
        SOP Instance UID of each slice's source object.
    """

    hu: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    source_files: tuple[Path, ...]
    source_frames: tuple[int, ...]
    sop_instance_uids: tuple[str, ...]
    #: Position of each slice along the slice normal relative to the first, in mm. Empty means
    #: a regular grid (``k * spacing_mm[0]``); filled when irregular spacing was accepted
    #: explicitly (``GeometryPolicy(allow_irregular_spacing=True)``).
    slice_positions_mm: tuple[float, ...] = ()

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        dz, dy, dx = self.spacing_mm
        return dz * dy * dx / 1000.0

    def slice_positions(self) -> npt.NDArray[np.float64]:
        """Position of each slice along the normal relative to the first, in mm."""
        if self.slice_positions_mm:
            return np.asarray(self.slice_positions_mm, dtype=np.float64)
        return np.arange(self.hu.shape[0], dtype=np.float64) * self.spacing_mm[0]

    def slice_thickness_weights(self) -> npt.NDArray[np.float64]:
        """Thickness (mm) each slice represents: half the distance to each neighbour.

        Equal to ``spacing_mm[0]`` everywhere on a regular grid; used for volumes of
        irregularly spaced series.
        """
        z = self.slice_positions()
        if z.size < 2:
            return np.full(z.shape, self.spacing_mm[0])
        edges = np.concatenate([[z[0] - (z[1] - z[0]) / 2], (z[1:] + z[:-1]) / 2,
                                [z[-1] + (z[-1] - z[-2]) / 2]])
        return np.diff(edges)


@dataclass(frozen=True)
class RegionMeasurement:
    """Volumes for one region (left lung, right lung or both lungs)."""

    lung_ml: float
    infiltrate_ml: float
    ground_glass_ml: float
    consolidation_ml: float

    @property
    def percent_involved(self) -> float:
        """Infiltrate volume as a percentage of lung volume (0 when the lung is empty)."""
        return 100.0 * self.infiltrate_ml / self.lung_ml if self.lung_ml > 0 else 0.0


@dataclass(frozen=True)
class Measurements:
    """Measurements reported in the TID 1500 SR."""

    left: RegionMeasurement
    right: RegionMeasurement
    both: RegionMeasurement
    #: Infiltrate voxels found outside the lung mask before they were clipped to it, in mL.
    infiltrate_outside_lung_ml: float = 0.0


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced a result (goes into algorithm identification)."""

    name: str
    version: str
    sha256: str
    family: str = "3D U-Net, R3D-18 encoder"


@dataclass(frozen=True)
class InferenceResult:
    """Everything ``node/`` needs to encode and send results for one series.

    Attributes
    ----------
    volume:
        The series as read (geometry and source references; ``hu`` is kept for overlays).
    lung_labels:
        ``uint8`` array on the source grid: 0 background, 1 right lung, 2 left lung.
    infiltrate:
        ``bool`` array on the source grid, already limited to the lungs.
    measurements:
        Volumes and percentages.
    model:
        The model that produced ``infiltrate`` (and ``lung_labels`` if it has a lung class).
    lung_source:
        ``"model"`` or ``"threshold"``: which method made the lung mask.
    seconds:
        Wall time per stage (e.g. ``{"read": 0.3, "infer": 12.0}``).
    """

    volume: SeriesVolume
    lung_labels: npt.NDArray[np.uint8]
    infiltrate: npt.NDArray[np.bool_]
    measurements: Measurements
    model: ModelInfo
    lung_source: str = "threshold"
    seconds: dict[str, float] = field(default_factory=dict)
