"""CT phantom generator: synthetic chest CT volumes with exact lung and infiltrate masks.

This module owns the synthetic data used by the tests and to train the former demo model (the
starting weights of the bundled lungnode-ct model).
Anatomy is defined in millimetres, so a phantom can be drawn at any spacing:

* body (skin/fat -100 HU, muscle ~40 HU) in air (-1000 HU), ribs as slanted hoops (300-800 HU),
  spine, aorta, heart (30-60 HU);
* two lungs (-880 to -820 HU with texture) as deformed ellipsoids, the heart carved out of the left
  one; trachea and main bronchi (air, with a wall) excluded from the lung mask;
* pulmonary vessels (intersections of two smooth random fields' zero sets: a branching tube
  network, thicker near the hila), part of the lung mask;
* COVID-like lesions whose *shapes are real MosMed lesion components* (:mod:`.lesions`),
  resampled, flipped and scaled, placed inside the lungs: ground glass (-750 to -300 HU, vessels
  visible through it) and consolidation cores (-100 to +50 HU);
* scanner blur and spatially correlated noise (10-35 HU).

The infiltrate mask is exactly the placed lesions intersected with the lung mask; the lung mask
includes vessels and lesions (as in COVID-19-CT-Seg's lung masks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lungnode.training.lesions import Lesion, LesionBank

__all__ = ["Phantom", "PhantomOptions", "make_phantom", "resample_lesion"]

F32 = npt.NDArray[np.float32]
BoolArr = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class PhantomOptions:
    """What a phantom looks like.

    Attributes
    ----------
    shape:
        ``(D, H, W)`` voxels.
    spacing_mm:
        ``(slice, row, column)`` spacing.
    max_lesions:
        Upper bound on placed lesions (the count is uniform in ``[0, max_lesions]`` unless
        ``empty_fraction`` forces zero).
    empty_fraction:
        Share of phantoms with no lesion at all.
    lesion_scale:
        Range of the isotropic scale applied to each real lesion shape.
    consolidation_fraction:
        Share of lesions with a consolidation core.
    noise_hu:
        Range of the noise standard deviation.
    """

    shape: tuple[int, int, int] = (64, 176, 176)
    spacing_mm: tuple[float, float, float] = (2.5, 2.0, 2.0)
    max_lesions: int = 10
    empty_fraction: float = 0.1
    lesion_scale: tuple[float, float] = (1.0, 2.0)
    consolidation_fraction: float = 0.35
    noise_hu: tuple[float, float] = (10.0, 35.0)


@dataclass
class Phantom:
    """One synthetic CT.

    Attributes
    ----------
    hu:
        ``int16`` HU ``(D, H, W)``.
    lung:
        ``bool`` lung mask (vessels and lesions included, airways outside the lungs excluded).
    infiltrate:
        ``bool`` infiltrate mask (inside ``lung``).
    spacing_mm:
        Voxel spacing.
    lesion_studies:
        MosMed studies whose lesion shapes were used.
    """

    hu: npt.NDArray[np.int16]
    lung: BoolArr
    infiltrate: BoolArr
    spacing_mm: tuple[float, float, float]
    lesion_studies: list[str] = field(default_factory=list)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], factor: int) -> F32:
    """Unit-variance smooth random field: coarse white noise, blurred, upsampled (linear)."""
    coarse = tuple(max(2, -(-s // factor) + 2) for s in shape)
    c = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.6)
    zoom = [s / (c_ - 1.5) for s, c_ in zip(shape, coarse, strict=False)]
    up = ndimage.zoom(c, zoom, order=1, mode="mirror", grid_mode=False)
    out = up[tuple(slice(0, s) for s in shape)]
    if out.shape != shape:  # zoom rounding: pad by edge
        out = np.pad(out, [(0, s - o) for s, o in zip(shape, out.shape, strict=False)], mode="edge")
    out = out - out.mean()
    return (out / (out.std() + 1e-6)).astype(np.float32)


def _segment_distance(
    zz: F32, yy: F32, xx: F32, a: tuple[float, float, float], b: tuple[float, float, float]
) -> F32:
    """Distance (mm) from each voxel to the segment a-b (points as (z, y, x) mm)."""
    ab = np.subtract(b, a)
    denom = float(np.dot(ab, ab)) or 1.0
    t = ((zz - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (xx - a[2]) * ab[2]) / denom
    t = np.clip(t, 0.0, 1.0)
    d2 = (zz - a[0] - t * ab[0]) ** 2 + (yy - a[1] - t * ab[1]) ** 2 + (xx - a[2] - t * ab[2]) ** 2
    return np.sqrt(d2).astype(np.float32)


def resample_lesion(
    lesion: Lesion,
    spacing_mm: tuple[float, float, float],
    scale: float,
    rng: np.random.Generator,
) -> BoolArr:
    """A real lesion shape on the phantom grid: flipped, scaled, resampled with tapered ends.

    Parameters
    ----------
    lesion:
        Component from the bank.
    spacing_mm:
        Target spacing.
    scale:
        Isotropic size factor.
    rng:
        Random generator (flips and in-plane transpose).

    Returns
    -------
    numpy.ndarray
        ``bool`` mask on the target grid (may be empty for tiny lesions at coarse spacing).
    """
    m = lesion.mask.astype(np.float32)
    for ax in (0, 1, 2):
        if rng.random() < 0.5:
            m = np.flip(m, ax)
    if rng.random() < 0.5:
        m = np.swapaxes(m, 1, 2)
    m = np.pad(m, 1)  # zero border: tapered ends after interpolation
    zoom = [s * scale / t for s, t in zip(lesion.spacing_mm, spacing_mm, strict=False)]
    out = ndimage.zoom(m, zoom, order=1, grid_mode=True, mode="grid-constant")
    sig = [max(0.0, 0.35 * z) for z in zoom]
    out = ndimage.gaussian_filter(out, sig)
    return np.asarray(out > 0.5)


def make_phantom(
    rng: np.random.Generator, bank: LesionBank | None, options: PhantomOptions | None = None
) -> Phantom:
    """Draw one chest CT phantom.

    Parameters
    ----------
    rng:
        Random generator (a phantom is a pure function of its state).
    bank:
        Real lesion shapes; ``None`` draws phantoms without lesions.
    options:
        Size, spacing, lesion and noise settings.

    Returns
    -------
    Phantom
    """
    o = options or PhantomOptions()
    D, H, W = o.shape
    sz, sy, sx = o.spacing_mm
    z = ((np.arange(D, dtype=np.float32) - (D - 1) / 2) * sz)[:, None, None]
    y = ((np.arange(H, dtype=np.float32) - (H - 1) / 2) * sy)[None, :, None]
    x = ((np.arange(W, dtype=np.float32) - (W - 1) / 2) * sx)[None, None, :]
    zz, yy, xx = np.broadcast_arrays(z, y, x)
    ext_y, ext_x = (H - 1) * sy / 2, (W - 1) * sx / 2
    ext_z = max((D - 1) * sz / 2, 1.0)

    # body: ellipse filling ~85-95 % of the field, slightly varying along z
    a = ext_x * rng.uniform(0.82, 0.94) * (1 + 0.03 * np.sin(z / ext_z * 2))
    b = ext_y * rng.uniform(0.62, 0.75) * (1 + 0.03 * np.cos(z / ext_z * 2))
    yc = rng.uniform(-0.05, 0.05) * ext_y
    r_body = np.sqrt((x / a) ** 2 + ((y - yc) / b) ** 2)
    body = r_body < 1.0
    fat = rng.uniform(8.0, 20.0)
    cav_a, cav_b = a - fat - 12.0, b - fat - 12.0
    r_cav = np.sqrt((x / cav_a) ** 2 + ((y - yc) / cav_b) ** 2)
    cavity = r_cav < 1.0
    ca, cb = float(np.mean(cav_a)), float(np.mean(cav_b))  # scalar sizes for organ placement
    hu = np.full(o.shape, -1000.0, np.float32)
    hu[body] = -100.0 + 15.0 * rng.standard_normal()
    muscle = body & (np.sqrt((x / (a - fat)) ** 2 + ((y - yc) / (b - fat)) ** 2) < 1.0)
    hu[muscle] = 45.0
    hu[cavity] = 35.0

    # ribs: slanted hoops in the band just outside the cavity
    pitch = rng.uniform(22.0, 30.0)
    slant = rng.uniform(0.15, 0.35)
    band = (r_cav >= 1.0) & (r_cav < 1.0 + 9.0 / min(ca, cb))
    phase = np.mod((zz + slant * (yy - yc) + rng.uniform(0, pitch)) / pitch, 1.0)
    ribs = band & (phase < 0.32) & (yy > -0.8 * b) | band & (phase < 0.32) & (np.abs(xx) > 0.3 * a)
    hu[ribs] = rng.uniform(350.0, 750.0)
    spine = ((x / 18.0) ** 2 + ((y - yc - (cb - 10.0)) / 18.0) ** 2) < 1.0
    spine = np.broadcast_to(spine, o.shape)
    hu[spine] = rng.uniform(300.0, 500.0)

    # lungs: deformed ellipsoids
    deform = _smooth_noise(rng, o.shape, max(4, int(40.0 / min(sy, sx))))
    lung = np.zeros(o.shape, bool)
    z_top = ext_z * rng.uniform(0.9, 1.3)
    for side in (-1.0, 1.0):
        cx = side * ca * rng.uniform(0.44, 0.52)
        ax = ca * rng.uniform(0.40, 0.47)
        ay = cb * rng.uniform(0.75, 0.88)
        cz = rng.uniform(-0.1, 0.1) * ext_z
        f = ((xx - cx) / ax) ** 2 + ((yy - yc - 0.05 * cb) / ay) ** 2 + ((zz - cz) / z_top) ** 2
        lung |= (f + 0.12 * deform) < 1.0
    lung &= cavity & ~spine
    # heart (patient left = image right, +x), anterior, lower half
    hz = -ext_z * rng.uniform(0.2, 0.6)
    heart = (((xx - 0.22 * ca) / rng.uniform(45, 60)) ** 2 + ((yy - yc + 0.25 * cb) / rng.uniform(38, 50))
             ** 2 + ((zz - hz) / rng.uniform(50, 70)) ** 2) < 1.0
    aorta = np.broadcast_to((((x + 12.0) ** 2 + (y - yc - 0.35 * cb) ** 2) < 13.0 ** 2), o.shape)
    mediastinum = np.broadcast_to(np.abs(x) < 0.16 * ca, o.shape) & cavity
    lung &= ~heart & ~aorta & ~mediastinum
    hu[heart] = rng.uniform(30.0, 60.0)
    hu[aorta] = rng.uniform(40.0, 220.0)

    # airways: trachea and main bronchi (outside the lung mask)
    carina = (ext_z * rng.uniform(-0.1, 0.3), yc - 0.05 * cb, 0.0)
    top = (ext_z * 1.5, carina[1], 0.0)
    d_air = _segment_distance(zz, yy, xx, top, carina)
    for side in (-1.0, 1.0):
        end = (carina[0] - rng.uniform(25, 40), carina[1] + 5.0, side * ca * rng.uniform(0.30, 0.38))
        d_air = np.minimum(d_air, _segment_distance(zz, yy, xx, carina, end) + 2.5)
    airway_wall = d_air < 11.0
    airway = d_air < 8.5
    lung &= ~airway_wall

    texture = _smooth_noise(rng, o.shape, 3)
    lung_hu = rng.uniform(-880.0, -820.0) + 18.0 * texture + 20.0 * (yy - yc) / max(cb, 1.0)
    hu[lung] = lung_hu[lung]

    # vessels: intersection of two random fields' zero sets, thicker near the hila
    n1 = _smooth_noise(rng, o.shape, max(3, int(14.0 / min(sy, sx))))
    n2 = _smooth_noise(rng, o.shape, max(3, int(14.0 / min(sy, sx))))
    hilum = np.minimum(np.sqrt((xx - 0.5 * ca) ** 2 + (yy - yc) ** 2 + (zz - carina[0]) ** 2),
                       np.sqrt((xx + 0.5 * ca) ** 2 + (yy - yc) ** 2 + (zz - carina[0]) ** 2))
    width = 0.10 + 0.14 * np.exp(-hilum / 40.0)
    vessels = lung & (np.abs(n1) < width) & (np.abs(n2) < width)

    # lesions from real MosMed shapes
    infiltrate = np.zeros(o.shape, bool)
    consolidation = np.zeros(o.shape, bool)
    studies: list[str] = []
    empty = bank is None or rng.random() < o.empty_fraction
    n_les = 0 if empty else int(rng.integers(1, o.max_lesions + 1))
    lung_idx = np.flatnonzero(lung)
    if bank is not None:  # larger real lesions more often (weight ~ sqrt of volume)
        w = np.sqrt(np.asarray([les.mask.sum() for les in bank.lesions], np.float64))
        w /= w.sum()
    for _ in range(n_les):
        if lung_idx.size == 0:
            break
        assert bank is not None
        les = bank.lesions[int(rng.choice(len(bank), p=w))]
        shape_m = resample_lesion(les, o.spacing_mm, float(rng.uniform(*o.lesion_scale)), rng)
        if not shape_m.any():
            continue
        c = np.unravel_index(lung_idx[int(rng.integers(lung_idx.size))], o.shape)
        lo = [int(ci) - s // 2 for ci, s in zip(c, shape_m.shape, strict=False)]
        spans = list(zip(lo, shape_m.shape, o.shape, strict=True))
        src = tuple(slice(max(0, -l0), min(s, n - l0)) for l0, s, n in spans)
        dst = tuple(slice(max(0, l0), min(n, l0 + s)) for l0, s, n in spans)
        piece = shape_m[src]
        if not piece.any():
            continue
        infiltrate[dst] |= piece
        studies.append(les.study)
        if rng.random() < o.consolidation_fraction:
            dist = ndimage.distance_transform_edt(piece)
            consolidation[dst] |= dist > max(1.0, 0.45 * float(dist.max()))
    infiltrate &= lung
    consolidation &= infiltrate

    # HU of lesions with soft edges; vessels stay visible through ground glass
    if infiltrate.any():
        ggo_hu = rng.uniform(-700.0, -350.0) + 40.0 * texture
        alpha = np.clip(ndimage.gaussian_filter(infiltrate.astype(np.float32), 0.6), 0.0, 1.0)
        alpha = np.where(infiltrate, np.maximum(alpha, 0.6), alpha * lung)
        hu = np.where(lung, hu * (1 - alpha) + ggo_hu * alpha, hu).astype(np.float32)
        cons_hu = rng.uniform(-90.0, 40.0) + 15.0 * texture
        hu[consolidation] = cons_hu[consolidation]
    hu[vessels & ~consolidation] = rng.uniform(20.0, 60.0)
    hu[airway] = -1000.0
    hu[airway_wall & ~airway] = np.maximum(hu[airway_wall & ~airway], 20.0)

    # scanner: blur + correlated noise
    hu = ndimage.gaussian_filter(hu, (0.4, 0.6, 0.6))
    noise = ndimage.gaussian_filter(rng.standard_normal(o.shape).astype(np.float32), 0.7)
    noise *= float(rng.uniform(*o.noise_hu)) / (float(noise.std()) + 1e-6)
    hu = np.clip(hu + noise, -1024, 3071)
    return Phantom(hu.astype(np.int16), lung, infiltrate, o.spacing_mm, studies)
