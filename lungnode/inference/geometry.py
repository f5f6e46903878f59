"""Slice geometry validation: the one place that decides whether slices form a usable volume.

This module owns every geometric rule a series must satisfy before it is turned into a volume:
one Frame of Reference, one orientation, one image size, no gantry tilt, no duplicate positions,
no missing slices and a regular slice step. It works on plain tuples (positions, orientations,
rows/columns, instance numbers) so that ``node/`` can call :func:`check_slice_geometry` on
header-only data from its database without reading pixels, and ``inference/`` calls the same
function before stacking pixels.

Frame of Reference
------------------
Image Position and Orientation (Patient) are coordinates in the slice's Frame of Reference; slices
of different Frames of Reference are in different coordinate systems, so nothing says how they
lie relative to each other, and a Segmentation of the volume could name only one of them. A
series whose slices carry more than one (non-empty) Frame of Reference UID is therefore rejected,
even when the positions happen to line up (as in LIDC-IDRI-0314, where each slice has its own
UID); the reason says so and names two slices that differ. Slices without the UID are not
counted (the CT IOD requires it; the reader refuses what else is missing).

Tolerances (all configurable through :class:`GeometryPolicy`)
-------------------------------------------------------------
* Orientation: every direction cosine must agree with the first slice's within ``1e-3``
  (about 0.06 degrees); each cosine vector must have unit length within ``1e-2`` and the two
  must be orthogonal within ``1e-2``.
* Gantry tilt / shear: the step between consecutive slice positions must be parallel to the
  slice normal; the in-plane component of each step may be at most ``max_tilt_deg`` degrees
  (default 0.5 degrees) of the step length (DICOM writers round positions to ~0.01 mm).
* Regular spacing: every step along the normal must equal the median step within
  ``max(spacing_abs_tol_mm, spacing_rel_tol * median)`` (defaults 0.05 mm and 1 %).
  A step larger than ``1.5 x`` the median is reported as missing slice(s); a step of (almost)
  zero as a duplicate position.

A series that fails is rejected with :class:`GeometryError`, whose message names the rule and the
offending slices. Irregular (but gap-free, tilt-free) spacing can be accepted explicitly with
``GeometryPolicy(allow_irregular_spacing=True)``: the report then keeps the true slice positions
and the engine resamples using them, never assuming a constant step.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GeometryError",
    "GeometryPolicy",
    "GeometryReport",
    "check_slice_geometry",
    "median_slice_step_mm",
    "slice_normal",
    "tilt_from_axial_deg",
]


class GeometryError(ValueError):
    """A series whose geometry cannot be turned into a trustworthy volume.

    Parameters
    ----------
    reason:
        Human-readable explanation (shown to users and stored by ``node/``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class GeometryPolicy:
    """Tolerances and permissions of :func:`check_slice_geometry` (see module docstring)."""

    orientation_tol: float = 1e-3
    spacing_rel_tol: float = 0.01
    spacing_abs_tol_mm: float = 0.05
    max_tilt_deg: float = 0.5
    missing_slice_factor: float = 1.5
    min_slices: int = 10
    allow_irregular_spacing: bool = False


@dataclass(frozen=True)
class GeometryReport:
    """Result of a successful geometry check.

    Attributes
    ----------
    order:
        Indices into the input sequences, sorted by increasing position along the slice normal.
    positions_along_normal_mm:
        Position of each slice along the normal, in sorted order.
    slice_spacing_mm:
        Median distance between consecutive slice centres.
    pixel_spacing_mm:
        ``(row spacing, column spacing)``: the distance between rows and between columns.
    rows, columns:
        Image size shared by all slices.
    direction:
        3x3 tuple; columns are the row direction, column direction and slice normal.
    origin_mm:
        Image position (patient) of the first sorted slice.
    regular:
        True when every step is within tolerance of the median.
    max_spacing_deviation_mm:
        Largest absolute deviation of a step from the median.
    """

    order: tuple[int, ...]
    positions_along_normal_mm: tuple[float, ...]
    slice_spacing_mm: float
    pixel_spacing_mm: tuple[float, float]
    rows: int
    columns: int
    direction: tuple[tuple[float, float, float], ...]
    origin_mm: tuple[float, float, float]
    regular: bool
    max_spacing_deviation_mm: float

    @property
    def num_slices(self) -> int:
        """Number of slices."""
        return len(self.order)


def _fmt(values: Sequence[object]) -> str:
    shown = ", ".join(str(v) for v in values[:8])
    return shown + (", ..." if len(values) > 8 else "")


def check_slice_geometry(
    positions: Sequence[Sequence[float]],
    orientations: Sequence[Sequence[float]],
    sizes: Sequence[tuple[int, int]],
    pixel_spacings: Sequence[Sequence[float]] | None = None,
    instance_numbers: Sequence[int | None] | None = None,
    policy: GeometryPolicy | None = None,
    frames_of_reference: Sequence[str | None] | None = None,
) -> GeometryReport:
    """Validate the geometry of a stack of slices and return how to sort them.

    Parameters
    ----------
    positions:
        ImagePositionPatient (x, y, z) of each slice (or frame), in mm.
    orientations:
        ImageOrientationPatient (6 direction cosines) of each slice.
    sizes:
        ``(rows, columns)`` of each slice.
    pixel_spacings:
        PixelSpacing ``(row spacing, column spacing)`` of each slice; ``None`` when unknown
        (the report then says 1 mm, callers that need real volumes must pass it).
    instance_numbers:
        InstanceNumber of each slice, used only to word error messages.
    policy:
        Tolerances; the defaults of :class:`GeometryPolicy` when omitted.
    frames_of_reference:
        Frame of Reference UID of each slice (None or empty when absent); ``None`` when unknown
        (not checked).

    Returns
    -------
    GeometryReport
        Sort order, spacing and orientation of the validated volume.

    Raises
    ------
    GeometryError
        With a human-readable reason when a rule is broken.
    """
    pol = policy or GeometryPolicy()
    n = len(positions)
    if not (len(orientations) == len(sizes) == n):
        raise GeometryError("internal: positions, orientations and sizes differ in length")
    labels = (
        [f"instance {v}" if v is not None else f"slice {i + 1}" for i, v in enumerate(instance_numbers)]
        if instance_numbers is not None
        else [f"slice {i + 1}" for i in range(n)]
    )
    if n < pol.min_slices:
        raise GeometryError(
            f"series has {n} slice(s); at least {pol.min_slices} are needed for a volume"
        )
    if n == 0:
        raise GeometryError("series has no slices")
    for i in range(n):
        if positions[i] is None or len(positions[i]) != 3:
            raise GeometryError(f"{labels[i]} has no valid Image Position (Patient)")
        if orientations[i] is None or len(orientations[i]) != 6:
            raise GeometryError(f"{labels[i]} has no valid Image Orientation (Patient)")

    # --- frame of reference -------------------------------------------------------------------
    if frames_of_reference is not None:
        _check_one_frame_of_reference(frames_of_reference, labels)

    # --- image size ---------------------------------------------------------------------------
    distinct_sizes = sorted({(int(r), int(c)) for r, c in sizes})
    if len(distinct_sizes) > 1:
        raise GeometryError(
            "slices have different image sizes: "
            + ", ".join(f"{r}x{c}" for r, c in distinct_sizes)
        )
    rows, columns = distinct_sizes[0]

    # --- orientation ----------------------------------------------------------------------------
    ori = np.asarray(orientations, dtype=np.float64)
    dev = np.abs(ori - ori[0]).max(axis=1)
    bad = [labels[i] for i in np.nonzero(dev > pol.orientation_tol)[0]]
    if bad:
        raise GeometryError(
            f"slices have more than one orientation ({len(bad)} differ from the first: "
            f"{_fmt(bad)})"
        )
    row_dir, col_dir = ori[0, :3], ori[0, 3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-2 or abs(np.linalg.norm(col_dir) - 1) > 1e-2:
        raise GeometryError("Image Orientation (Patient) cosines are not unit vectors")
    if abs(float(row_dir @ col_dir)) > 1e-2:
        raise GeometryError("Image Orientation (Patient) row and column are not orthogonal")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    # --- pixel spacing --------------------------------------------------------------------------
    if pixel_spacings is not None:
        ps = np.asarray(pixel_spacings, dtype=np.float64)
        if ps.shape != (n, 2) or not np.all(ps > 0):
            raise GeometryError("Pixel Spacing is missing or not positive")
        if np.abs(ps - ps[0]).max() > 1e-3 * float(ps[0].max()):
            raise GeometryError("slices have different pixel spacings")
        pixel_spacing = (float(ps[0, 0]), float(ps[0, 1]))
    else:
        pixel_spacing = (1.0, 1.0)

    # --- sort along the normal ------------------------------------------------------------------
    pos = np.asarray(positions, dtype=np.float64)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    along_s = along[order]
    pos_s = pos[order]
    if n == 1:
        return GeometryReport(
            order=tuple(int(i) for i in order),
            positions_along_normal_mm=tuple(float(v) for v in along_s),
            slice_spacing_mm=1.0,
            pixel_spacing_mm=pixel_spacing,
            rows=rows,
            columns=columns,
            direction=_direction(row_dir, col_dir, normal),
            origin_mm=(float(pos_s[0, 0]), float(pos_s[0, 1]), float(pos_s[0, 2])),
            regular=True,
            max_spacing_deviation_mm=0.0,
        )

    steps = np.diff(along_s)
    dup = np.nonzero(steps < max(pol.spacing_abs_tol_mm, 1e-3))[0]
    if dup.size:
        pairs = [f"{labels[order[i]]} and {labels[order[i + 1]]}" for i in dup[:4]]
        raise GeometryError(
            f"{dup.size} pair(s) of slices share the same position ({'; '.join(pairs)}): "
            "duplicate or mixed acquisitions"
        )

    # --- gantry tilt / shear: in-plane component of each step -----------------------------------
    delta = np.diff(pos_s, axis=0)
    in_plane = np.linalg.norm(delta - np.outer(steps, normal), axis=1)
    tilt_deg = np.degrees(np.arctan2(in_plane, steps))
    worst = float(tilt_deg.max())
    if worst > pol.max_tilt_deg:
        raise GeometryError(
            f"slice positions are not along the slice normal (gantry tilt or sheared stack: "
            f"{worst:.2f} degrees, tolerance {pol.max_tilt_deg} degrees); tilted series are "
            "not supported"
        )

    # --- spacing --------------------------------------------------------------------------------
    median = float(np.median(steps))
    tol = max(pol.spacing_abs_tol_mm, pol.spacing_rel_tol * median)
    deviation = np.abs(steps - median)
    gaps = np.nonzero(steps > pol.missing_slice_factor * median)[0]
    if gaps.size:
        where = [
            f"between {labels[order[i]]} and {labels[order[i + 1]]} "
            f"({steps[i]:.2f} mm, about {round(steps[i] / median) - 1} missing)"
            for i in gaps[:4]
        ]
        raise GeometryError(
            f"missing slice(s): the slice step is {median:.2f} mm but jumps "
            + "; ".join(where)
        )
    regular = bool(deviation.max() <= tol)
    if not regular and not pol.allow_irregular_spacing:
        i = int(deviation.argmax())
        raise GeometryError(
            f"irregular slice spacing: steps range {steps.min():.3f}-{steps.max():.3f} mm around "
            f"{median:.3f} mm (tolerance {tol:.3f} mm), worst between {labels[order[i]]} and "
            f"{labels[order[i + 1]]}"
        )
    return GeometryReport(
        order=tuple(int(i) for i in order),
        positions_along_normal_mm=tuple(float(v) for v in along_s),
        slice_spacing_mm=median,
        pixel_spacing_mm=pixel_spacing,
        rows=rows,
        columns=columns,
        direction=_direction(row_dir, col_dir, normal),
        origin_mm=(float(pos_s[0, 0]), float(pos_s[0, 1]), float(pos_s[0, 2])),
        regular=regular,
        max_spacing_deviation_mm=float(deviation.max()),
    )


def _check_one_frame_of_reference(uids: Sequence[str | None], labels: Sequence[str]) -> None:
    """Raise :class:`GeometryError` when the slices carry more than one Frame of Reference UID."""
    first: dict[str, int] = {}
    for i, uid in enumerate(uids):
        key = str(uid or "").strip()
        if key and key not in first:
            first[key] = i
    if len(first) > 1:
        a, b = sorted(first.values())[:2]
        raise GeometryError(
            f"the slices belong to {len(first)} different Frames of Reference ({labels[a]} and "
            f"{labels[b]} differ): their positions are not in one coordinate system, so they "
            "cannot be stacked into one volume; the scanner or an anonymiser gave the slices "
            "different Frame of Reference UIDs, and the series has to be re-exported with one"
        )


def _direction(
    row_dir: np.ndarray, col_dir: np.ndarray, normal: np.ndarray
) -> tuple[tuple[float, float, float], ...]:
    """3x3 direction matrix (rows of the tuple are x, y, z; columns row/col/normal)."""
    m = np.stack([row_dir, col_dir, normal], axis=1)
    return tuple((float(r[0]), float(r[1]), float(r[2])) for r in m)


def angle_between_deg(a: Sequence[float], b: Sequence[float]) -> float:
    """Angle between two 3-vectors in degrees (helper for callers' messages)."""
    va, vb = np.asarray(a, float), np.asarray(b, float)
    c = float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


# Tolerant measurements for describing a series that may not pass :func:`check_slice_geometry`
# (selection rules describe every series, usable or not). Plain floats, no numpy.

def slice_normal(orientation: Sequence[float]) -> tuple[float, float, float] | None:
    """Unit slice normal (row direction x column direction) of an ImageOrientationPatient.

    Returns ``None`` when ``orientation`` does not have six values or its vectors are parallel.
    """
    if len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    length = math.sqrt(sum(v * v for v in n))
    if length < 1e-6:
        return None
    return (n[0] / length, n[1] / length, n[2] / length)


def tilt_from_axial_deg(normal: Sequence[float]) -> float:
    """Angle in degrees between a unit slice normal and the patient z axis (0 = axial)."""
    return math.degrees(math.acos(min(1.0, abs(normal[2]))))


def median_slice_step_mm(positions: Sequence[Sequence[float] | None],
                         normal: Sequence[float]) -> float | None:
    """Median distance between consecutive slice positions along ``normal``.

    Positions that are ``None`` or not 3 values are skipped, steps under 1 micrometre (duplicate
    positions) ignored; ``None`` when no step remains.
    """
    along = sorted(sum(p * n for p, n in zip(pos, normal, strict=True))
                   for pos in positions if pos is not None and len(pos) == 3)
    steps = [b - a for a, b in itertools.pairwise(along) if b - a > 1e-3]
    return float(statistics.median(steps)) if steps else None
