"""Painting real COVID-19 lesion shapes into real chest CT: the appearance models.

This module owns turning a host CT (HU + lung labels, any grid) and a bank of real lesion shapes
(:mod:`.lesions`, MosMedData masks) into a semi-synthetic case with an exact infiltrate mask:

* **shape**: a bank lesion resampled to the host's spacing, scaled (``scale``), flipped, rotated
  in-plane (``rotate_deg``) and elastically warped (smooth random displacement of up to
  ``warp_mm``); border either smooth or irregular (the mask perturbed by smooth noise);
* **placement**: centre drawn from the lung voxels of one lung (both lungs used over a case) with
  weights favouring the periphery (distance to the lung border), the bases and the dorsal lung,
  as COVID-19 pneumonia is distributed; the lesion is clipped to the lung;
* **appearance** (one per lesion, drawn by ``kind_weights``):
  ``ggo`` ground glass raising the parenchyma towards a level in ``ggo_hu`` (-750...-300) while
  voxels already denser (vessels, bronchial walls) are left as they are, so they stay visible;
  ``consolidation`` replacing the tissue by ``consolidation_hu`` (-100...+50) plus host-matched
  noise, vessels hidden, air bronchograms (HU < -900 inside) kept dark; ``mixed`` ground glass
  with a consolidated core; ``crazy`` ground glass with a reticular network of thickened septa;
* **scanner match**: the painted change is blurred with a kernel-like Gaussian and noise with the
  host's own parenchymal noise level (:func:`host_noise_hu`) is added where tissue is replaced.

The infiltrate label is the painted region (smoothed shape > 0.5) inside the lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lungnode.training.lesions import Lesion, LesionBank

__all__ = ["PaintOptions", "Painted", "host_noise_hu", "paint_lesions", "placement_weights"]

F32 = npt.NDArray[np.float32]
KINDS = ("ggo", "consolidation", "mixed", "crazy")


@dataclass(frozen=True)
class PaintOptions:
    """How lesions are drawn (module docstring)."""

    lesions: tuple[int, int] = (2, 10)
    scale: tuple[float, float] = (0.9, 2.1)
    rotate_deg: float = 35.0
    warp_mm: float = 5.0
    ggo_hu: tuple[float, float] = (-750.0, -300.0)
    consolidation_hu: tuple[float, float] = (-100.0, 50.0)
    kind_weights: tuple[float, float, float, float] = (0.45, 0.15, 0.25, 0.15)
    irregular_fraction: float = 0.5
    peripheral_mm: float = 12.0
    min_lesion_ml: float = 0.3


@dataclass
class Painted:
    """A painted host: HU and the exact infiltrate mask, plus what was drawn."""

    hu: npt.NDArray[np.int16]
    infiltrate: npt.NDArray[np.bool_]
    kinds: list[str]


def host_noise_hu(hu: npt.NDArray[np.floating] | npt.NDArray[np.integer],
                  lung: npt.NDArray[np.bool_]) -> float:
    """Noise standard deviation of the host's lung parenchyma (high-pass residual, robust).

    Parameters
    ----------
    hu:
        Host HU.
    lung:
        Boolean lung mask.

    Returns
    -------
    float
        Estimated noise SD in HU (10-120 clamp).
    """
    zs = np.nonzero(lung.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return 20.0
    k = int(zs[len(zs) // 2])
    sl = hu[k].astype(np.float32)
    resid = sl - ndimage.gaussian_filter(sl, 1.5)
    sel = ndimage.binary_erosion(lung[k], iterations=3) & (sl < -600)
    if sel.sum() < 50:
        return 20.0
    mad = float(np.median(np.abs(resid[sel] - np.median(resid[sel]))))
    return float(np.clip(1.4826 * mad * 1.3, 10.0, 120.0))


def placement_weights(
    lung: npt.NDArray[np.bool_], spacing_mm: tuple[float, float, float], superior: float,
    posterior: float, peripheral_mm: float = 15.0,
) -> F32:
    """Sampling weight of each lung voxel as a lesion centre (0 outside the lung).

    Parameters
    ----------
    lung:
        Boolean lung mask.
    spacing_mm:
        Grid spacing.
    superior:
        +1 if increasing slice index goes to the head, -1 to the feet, 0 unknown.
    posterior:
        +1 if increasing row index goes to the patient's back, -1 to the front, 0 unknown.
    peripheral_mm:
        Decay length of the peripheral preference.

    Returns
    -------
    numpy.ndarray
        ``float32`` weights.
    """
    dist = ndimage.distance_transform_edt(lung, sampling=spacing_mm).astype(np.float32)
    w = np.exp(-dist / peripheral_mm) + 0.03
    zs = np.nonzero(lung.any(axis=(1, 2)))[0]
    rs = np.nonzero(lung.any(axis=(0, 2)))[0]
    if zs.size and superior != 0:
        h = (np.arange(lung.shape[0], dtype=np.float32) - zs.min()) / max(1, zs.max() - zs.min())
        h = h if superior > 0 else 1 - h
        w *= (1.6 - np.clip(h, 0, 1))[:, None, None]  # bases about 3x the apices
    if rs.size and posterior != 0:
        p = (np.arange(lung.shape[1], dtype=np.float32) - rs.min()) / max(1, rs.max() - rs.min())
        p = p if posterior > 0 else 1 - p
        w *= (0.7 + 0.6 * np.clip(p, 0, 1))[None, :, None]
    return np.where(lung, w, 0.0).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...],
                  sigma: float | tuple[float, ...]) -> F32:
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (f / (f.std() + 1e-6)).astype(np.float32)


def _mm(sigma_mm: float, spacing_mm: tuple[float, float, float]) -> tuple[float, ...]:
    """A Gaussian sigma in mm as voxels per axis (textures look the same on any grid)."""
    return tuple(max(0.3, sigma_mm / s) for s in spacing_mm)


def _lesion_shape(lesion: Lesion, spacing_mm: tuple[float, float, float], rng: np.random.Generator,
                  opt: PaintOptions) -> F32:
    """Soft lesion shape (0..1) on the host grid, transformed (module docstring)."""
    m = np.pad(lesion.mask.astype(np.float32), 2)
    for ax in (0, 1, 2):
        if rng.random() < 0.5:
            m = np.flip(m, ax)
    scale = float(rng.uniform(*opt.scale))
    zoom = [s * scale / t for s, t in zip(lesion.spacing_mm, spacing_mm, strict=True)]
    m = ndimage.zoom(m, zoom, order=1, grid_mode=True, mode="grid-constant")
    if m.ndim != 3 or min(m.shape) < 1:
        return np.zeros((1, 1, 1), np.float32)
    m = ndimage.gaussian_filter(m, [max(0.0, 0.35 * z) for z in zoom])
    pad = [(2, 2), (4, 4), (4, 4)]
    m = np.pad(m, pad)
    ang = float(rng.uniform(-opt.rotate_deg, opt.rotate_deg))
    m = ndimage.rotate(m, ang, axes=(1, 2), reshape=True, order=1, mode="constant")
    if opt.warp_mm > 0:
        amp = [opt.warp_mm / s for s in spacing_mm]
        grid = np.indices(m.shape, dtype=np.float32)
        sig = [max(1.0, 10.0 / s) for s in spacing_mm]
        for ax in range(3):
            grid[ax] += amp[ax] * 0.5 * _smooth_field(rng, m.shape, sig[ax])
        m = ndimage.map_coordinates(m, grid, order=1, mode="constant")
    if rng.random() < opt.irregular_fraction:  # perturb the border band only, no holes inside
        band = (m > 0.05) & (m < 0.95)
        m = m + 0.35 * _smooth_field(rng, m.shape, _mm(2.5, spacing_mm)) * band
    return np.clip(m, 0.0, 1.0).astype(np.float32)


def _appearance(
    hu: F32, alpha: F32, kind: str, rng: np.random.Generator, noise_sd: float, opt: PaintOptions,
    spacing_mm: tuple[float, float, float],
) -> F32:
    """New HU inside a lesion box given the soft shape ``alpha``."""
    out = hu.copy()
    lo, hi = opt.ggo_hu
    if kind in ("ggo", "mixed", "crazy"):
        level = float(rng.uniform(lo, hi)) if kind != "crazy" else float(rng.uniform(-650, -400))
        texture = 40.0 * _smooth_field(rng, hu.shape, _mm(2.0, spacing_mm))
        raise_ = np.clip(level + texture - hu, 0.0, None) * float(rng.uniform(0.85, 1.0))
        out = out + alpha * raise_  # denser voxels (vessels) are not raised: they stay visible
        if kind == "crazy":
            septa = np.abs(_smooth_field(rng, hu.shape, _mm(2.5, spacing_mm))) < 0.12
            out = out + alpha * septa * float(rng.uniform(100.0, 250.0))
    if kind in ("consolidation", "mixed"):
        core = alpha
        if kind == "mixed":
            inner = ndimage.distance_transform_edt(alpha > 0.5)
            core = ndimage.gaussian_filter((inner > 0.45 * max(1.0, float(inner.max()))).astype(
                np.float32), 0.8) * alpha
        level = float(rng.uniform(*opt.consolidation_hu))
        noise = noise_sd * _smooth_field(rng, hu.shape, 0.6)
        bronchus = hu < -900  # air bronchograms stay dark
        target = np.where(bronchus, hu, level + noise)
        out = (out + core * (target - out)).astype(np.float32)
    return out


def paint_lesions(
    hu: npt.NDArray[np.int16], lung_labels: npt.NDArray[np.uint8],
    spacing_mm: tuple[float, float, float], bank: LesionBank, rng: np.random.Generator,
    superior: float = 1.0, posterior: float = 1.0, options: PaintOptions | None = None,
) -> Painted:
    """Paint several real lesion shapes into a host CT.

    Parameters
    ----------
    hu:
        Host HU ``(D, H, W)``.
    lung_labels:
        ``uint8`` lung labels (1 right, 2 left; any non-zero is lung).
    spacing_mm:
        Grid spacing.
    bank:
        Lesion shapes to draw from (pass a held-out bank for evaluation cases).
    rng:
        Random generator (a seed gives one case).
    superior, posterior:
        Orientation of slice and row axes (:func:`placement_weights`).
    options:
        Painting options.

    Returns
    -------
    Painted
    """
    opt = options or PaintOptions()
    lung = lung_labels > 0
    out = hu.astype(np.float32)
    label = np.zeros(hu.shape, bool)
    kinds: list[str] = []
    if not lung.any():
        return Painted(hu.copy(), label, kinds)
    noise_sd = host_noise_hu(hu, lung)
    weights = placement_weights(lung, spacing_mm, superior, posterior, opt.peripheral_mm)
    sides = [s for s in (1, 2) if (lung_labels == s).any()] or [int(lung_labels.max())]
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    probs = np.asarray(opt.kind_weights, np.float64) / sum(opt.kind_weights)
    n = int(rng.integers(opt.lesions[0], opt.lesions[1] + 1))
    blur = _mm(0.8, spacing_mm)  # kernel-like blur of the painted change
    for i in range(n):
        side = sides[i % len(sides)] if i < len(sides) else int(rng.choice(sides))
        w = np.where(lung_labels == side, weights, 0.0).ravel()
        if w.sum() <= 0:
            continue
        centre = np.unravel_index(int(rng.choice(w.size, p=w / w.sum())), hu.shape)
        shape = _lesion_shape(bank.lesions[int(rng.integers(len(bank)))], spacing_mm, rng, opt)
        lo = [int(c) - s // 2 for c, s in zip(centre, shape.shape, strict=True)]
        box = tuple(slice(max(0, a), min(n_, a + s)) for a, s, n_ in
                    zip(lo, shape.shape, hu.shape, strict=True))
        sbox = tuple(slice(b.start - a, b.stop - a) for b, a in zip(box, lo, strict=True))
        alpha = shape[sbox] * lung[box]
        region = (alpha > 0.5)
        if region.sum() * voxel_ml < opt.min_lesion_ml:
            continue
        kind = str(rng.choice(KINDS, p=probs))
        before = out[box]
        after = _appearance(before, alpha.astype(np.float32), kind, rng, noise_sd, opt, spacing_mm)
        delta = ndimage.gaussian_filter(after - before, blur)
        out[box] = before + delta * lung[box]
        label[box] |= region
        kinds.append(kind)
    return Painted(np.clip(np.rint(out), -1024, 3071).astype(np.int16), label & lung, kinds)
