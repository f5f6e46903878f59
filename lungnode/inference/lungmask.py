"""Lung mask without model weights: threshold, components, airway removal, hole filling, L/R split.

This module owns the classical lung segmentation used as the denominator of the percentages when
the model has no lung class, and the left/right split (also applied to a model's plain ``lung``
class). Steps (on a work grid of at least ``work_spacing_mm`` = 2.5 x 1.3 x 1.3 mm, made with the same
resampling as the model input; a 300-slice 512^2 series becomes about 95 x 255 x 255; the labels are
mapped back to the source grid by nearest neighbour):

1. air = HU < ``air_hu`` (-400);
2. outside air = 2D components of air touching the image border in each slice (removed);
3. 3D components of the remaining air: the largest is kept, and the second too when it holds at
   least ``second_lung_fraction`` of the first (two lungs not joined through the airways) *and*
   its superior end lies in the upper half of the first one's cranio-caudal extent (a lung reaches
   up to its apex; stomach or bowel gas starts at the diaphragm, so it never passes this test even
   when it is large);
4. trachea and main bronchi: per slice, 2D components smaller than ``airway_max_area_mm2``
   (600 mm^2) whose median HU is below ``airway_median_hu`` (-950; lumen air, while lung
   parenchyma is about -850) are removed (and remembered as the airway mask), then step 3 is
   repeated;
5. left/right: two separate components are assigned by the patient-space x of their centroid
   (DICOM LPS: patient right is -x, whatever the array orientation); a single component is cut at
   the patient-x plane with the fewest lung voxels in the central 30-70 % of its extent;
6. holes: per lung and slice, a morphological closing of radius ``closing_mm`` (10 mm) and hole
   filling, so dense consolidation and vessels enclosed by the lung count as lung.

Anatomy rules for a model's lung class (:func:`anatomical_lung_mask`): a network can call stomach
or bowel gas, the oesophagus, the trachea or outside air "lung". Its mask is therefore checked
against the threshold lungs (:class:`ThresholdLungs`): air voxels (HU < ``air_hu``) it marks are kept
only inside the threshold lungs (grown by ``air_tolerance_px`` pixels in-plane for partial volume),
airway voxels are removed, components that do not overlap the threshold lungs are dropped, and
nothing below the *lung base* (the most caudal slice of the threshold lungs, i.e. the deepest
point of the costophrenic recesses, minus ``base_margin_mm``) is kept. Dense voxels (consolidation
the threshold misses) stay when they belong to a component that touches the aerated lungs.

Limitations: consolidation touching the chest wall deeper than the closing radius is not
recovered; a lung that is entirely consolidated in a slice is lost in that slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from lungnode.inference.predict import labels_to_source, model_grid, resample_to_model_grid
from lungnode.inference.types import LUNG_LEFT, LUNG_RIGHT, SeriesVolume

__all__ = [
    "LungMaskOptions",
    "ThresholdLungs",
    "anatomical_lung_mask",
    "lung_base_cut",
    "patient_x_of_voxels",
    "split_left_right",
    "superior_sign",
    "threshold_lung_mask",
    "threshold_lungs",
]


@dataclass(frozen=True)
class LungMaskOptions:
    """Thresholds of :func:`threshold_lung_mask` (see module docstring)."""

    air_hu: float = -400.0
    airway_max_area_mm2: float = 600.0
    airway_median_hu: float = -950.0
    second_lung_fraction: float = 0.1
    min_lung_ml: float = 5.0
    closing_mm: float = 10.0
    work_spacing_mm: tuple[float, float, float] = (2.5, 1.3, 1.3)
    air_tolerance_px: int = 2
    base_margin_mm: float = 10.0


@dataclass(frozen=True)
class ThresholdLungs:
    """The threshold lung mask and what the anatomy rules need from it (source grid).

    Attributes
    ----------
    labels:
        ``uint8`` lung labels (0 background, 1 right, 2 left).
    airway:
        ``bool`` trachea and main bronchi found in step 4.
    body:
        ``bool`` the patient's body (:func:`body_mask` on the work grid): what lies outside it
        (air, the table, cushions and other positioning aids) can never be lung.
    """

    labels: npt.NDArray[np.uint8]
    airway: npt.NDArray[np.bool_]
    body: npt.NDArray[np.bool_]


def superior_sign(volume: SeriesVolume) -> float:
    """+1 when increasing slice index goes towards the head, -1 towards the feet, 0 if not axial.

    Parameters
    ----------
    volume:
        Source geometry (DICOM LPS: +z is superior).

    Returns
    -------
    float
    """
    nz = volume.direction[2][2]
    return float(np.sign(nz)) if abs(nz) >= 0.5 else 0.0


def _apex_ok(lab: npt.NDArray[np.int32], first: int, second: int, sup: float) -> bool:
    """Whether component ``second`` reaches the upper half of component ``first``'s z-extent."""
    if sup == 0.0:
        return True
    z1 = np.nonzero(np.bincount(np.nonzero(lab == first)[0], minlength=lab.shape[0]))[0]
    z2 = np.nonzero(np.bincount(np.nonzero(lab == second)[0], minlength=lab.shape[0]))[0]
    if sup > 0:
        return bool(z2.max() >= (z1.min() + z1.max()) / 2.0)
    return bool(z2.min() <= (z1.min() + z1.max()) / 2.0)


def _keep_lungs(mask: npt.NDArray[np.bool_], min_vox: int, frac: float,
                sup: float = 0.0) -> npt.NDArray[np.int32]:
    """Label image holding the largest component and a sizeable second one (labels 1, 2).

    With ``sup`` (:func:`superior_sign`) the second one must also reach the upper half of the first
    one's cranio-caudal extent (a lung, not gas below the diaphragm).
    """
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, np.int32)
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] if sizes[order[0]] >= min_vox else []
    for cand in order[1:4]:  # the next few: the second lung may be smaller than stomach gas
        if not keep or len(keep) == 2 or sizes[cand] < max(min_vox, frac * sizes[order[0]]):
            break
        if _apex_ok(lab, order[0] + 1, cand + 1, sup):
            keep.append(cand)
    lut = np.zeros(n + 1, np.int32)
    for i, c in enumerate(keep):
        lut[c + 1] = i + 1
    return lut[lab]


def body_mask(hu: npt.NDArray[np.floating], threshold_hu: float = -500.0,
              step: int = 2) -> npt.NDArray[np.bool_]:
    """The patient's body per slice: the largest soft-tissue region, holes filled.

    Parameters
    ----------
    hu:
        ``(slices, rows, columns)`` volume in HU.
    threshold_hu:
        Tissue is above this.
    step:
        In-plane subsampling used for speed (the mask is expanded back to full size).

    Returns
    -------
    numpy.ndarray
        Boolean mask, same shape as ``hu``; the table and anything detached from the body are out.
    """
    small = hu[:, ::step, ::step] > threshold_hu
    body = np.zeros(small.shape, bool)
    for k in range(small.shape[0]):
        lab, n = ndimage.label(small[k])
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        body[k] = ndimage.binary_fill_holes(lab == int(sizes.argmax()))
    full = body.repeat(step, axis=1).repeat(step, axis=2)
    return np.ascontiguousarray(full[:, : hu.shape[1], : hu.shape[2]])


def drop_stray_components(mask: npt.NDArray[np.bool_], body: npt.NDArray[np.bool_] | None = None,
                          min_fraction: float = 0.02) -> npt.NDArray[np.bool_]:
    """Remove a model's stray "lung" components: outside the body, or tiny.

    A model's lung class can fire on air pockets outside the body (the table, clothing) or on
    bowel gas. Real lung parts, dense consolidation included, lie inside the body and are
    connected to a lung in 3D, so a component is kept only when most of it is inside ``body`` and
    it is at least ``min_fraction`` of the largest kept component.

    Parameters
    ----------
    mask:
        Boolean lung mask.
    body:
        Boolean body mask (:func:`body_mask`); ``None`` skips the inside-the-body test.
    min_fraction:
        Smallest kept component, as a fraction of the largest one's size.

    Returns
    -------
    numpy.ndarray
        The filtered boolean mask (a new array; ``mask`` is unchanged).
    """
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    sizes[0] = 0
    if body is not None:
        inside = np.bincount(lab.ravel(), weights=body.ravel(), minlength=n + 1)
        sizes[inside < 0.5 * sizes] = 0
    if sizes.max() == 0:
        return np.zeros(mask.shape, bool)
    keep = sizes >= max(1.0, min_fraction * sizes.max())
    keep[0] = False
    return np.asarray(keep[lab], dtype=bool)


def patient_x_of_voxels(
    volume: SeriesVolume, idx: tuple[npt.NDArray[np.int64], ...], factor: int = 1
) -> npt.NDArray[np.float64]:
    """Patient-space x (mm, LPS: +x = patient left) of voxels given by array indices.

    Parameters
    ----------
    volume:
        Source geometry.
    idx:
        ``(k, r, c)`` index arrays (on a grid reduced in-plane by ``factor``).
    factor:
        In-plane reduction of the grid the indices refer to (block centres are used).

    Returns
    -------
    numpy.ndarray
    """
    k, r, c = idx
    _, dr, dc = volume.spacing_mm
    d = volume.direction
    z = volume.slice_positions()[k]
    rr = r * factor + (factor - 1) / 2.0
    cc = c * factor + (factor - 1) / 2.0
    return volume.origin_mm[0] + cc * dc * d[0][0] + rr * dr * d[0][1] + z * d[0][2]


def split_left_right(
    lung: npt.NDArray[np.bool_], volume: SeriesVolume, factor: int = 1,
    components: npt.NDArray[np.int32] | None = None,
) -> npt.NDArray[np.uint8]:
    """Label a lung mask 1 (right lung) / 2 (left lung) by patient-space x.

    Parameters
    ----------
    lung:
        Boolean lung mask.
    volume:
        Geometry of the source series.
    factor:
        In-plane reduction of ``lung`` relative to the source grid.
    components:
        Optional labels (1, 2) of two separate lungs; computed when omitted.

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels (0, 1, 2).
    """
    out = np.zeros(lung.shape, np.uint8)
    if not lung.any():
        return out
    if components is None:
        vox = max(1, int(lung.sum() * 0.001))
        components = _keep_lungs(lung, vox, 0.1)
    if components.max() >= 2:
        cx = []
        for lab in (1, 2):
            idx = np.nonzero(components == lab)
            cx.append(float(patient_x_of_voxels(volume, idx, factor).mean()))
        right = 1 if cx[0] < cx[1] else 2
        out[components == right] = LUNG_RIGHT
        out[components == 3 - right] = LUNG_LEFT
        # voxels of the mask outside both components: nearest side by x
        rest = lung & (components == 0)
        if rest.any():
            idx = np.nonzero(rest)
            x = patient_x_of_voxels(volume, idx, factor)
            out[idx] = np.where(x < (cx[0] + cx[1]) / 2, LUNG_RIGHT, LUNG_LEFT)
        return out
    idx = np.nonzero(lung)
    x = patient_x_of_voxels(volume, idx, factor)
    lo, hi = float(x.min()), float(x.max())
    bins = np.arange(lo, hi + 2.0, 2.0)
    hist, edges = np.histogram(x, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    central = (centres > lo + 0.3 * (hi - lo)) & (centres < lo + 0.7 * (hi - lo))
    cut = float(centres[central][np.argmin(hist[central])]) if central.any() else (lo + hi) / 2
    out[idx] = np.where(x < cut, LUNG_RIGHT, LUNG_LEFT)
    return out


def _close_and_fill(mask: npt.NDArray[np.bool_], radius_px: float) -> npt.NDArray[np.bool_]:
    """Per-slice closing (Euclidean radius) and hole filling, inside each slice's bounding box."""
    out = mask.copy()
    pad = int(np.ceil(radius_px)) + 2
    for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
        sl = mask[k]
        rows, cols = np.nonzero(sl)
        r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, sl.shape[0])
        c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, sl.shape[1])
        box = np.pad(sl[r0:r1, c0:c1], pad)
        if radius_px > 0:
            dilated = ndimage.distance_transform_edt(~box) <= radius_px
            box = (ndimage.distance_transform_edt(dilated) > radius_px) | box
        box = ndimage.binary_fill_holes(box)
        out[k, r0:r1, c0:c1] |= box[pad:-pad, pad:-pad]
    return out


def threshold_lung_mask(
    volume: SeriesVolume, options: LungMaskOptions | None = None,
    device: torch.device | str = "cpu",
) -> npt.NDArray[np.uint8]:
    """Lung labels (0 background, 1 right, 2 left) from HU alone (see :func:`threshold_lungs`).

    Parameters
    ----------
    volume:
        The series in HU.
    options:
        Thresholds (:class:`LungMaskOptions`).
    device:
        Where the resampling runs.

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels on the source grid.
    """
    return threshold_lungs(volume, options, device).labels


def threshold_lungs(
    volume: SeriesVolume, options: LungMaskOptions | None = None,
    device: torch.device | str = "cpu",
) -> ThresholdLungs:
    """Threshold lung labels and the airway mask (module docstring, steps 1-6).

    Parameters
    ----------
    volume:
        The series in HU.
    options:
        Thresholds (:class:`LungMaskOptions`).
    device:
        Where the resampling to and from the work grid runs (``"cuda"`` speeds it up; the
        connected-component work is always on the CPU).

    Returns
    -------
    ThresholdLungs
        Labels and airway mask on the source grid.
    """
    opt = options or LungMaskOptions()
    dz, dr, dc = volume.spacing_mm
    src_z = volume.slice_positions()
    target = (max(dz, opt.work_spacing_mm[0]), max(dr, opt.work_spacing_mm[1]),
              max(dc, opt.work_spacing_mm[2]))
    grid = model_grid(volume.hu.shape, src_z, (dr, dc), target)
    small = resample_to_model_grid(volume.hu, grid, device=device).cpu().numpy()
    n_w, h_w, w_w = grid.shape
    pr = (volume.hu.shape[1] - 1) * dr / max(h_w - 1, 1)
    pc = (volume.hu.shape[2] - 1) * dc / max(w_w - 1, 1)
    pz = float(grid.z_positions_mm[1] - grid.z_positions_mm[0]) if n_w > 1 else dz
    work = SeriesVolume(hu=small, spacing_mm=(pz, pr, pc), origin_mm=volume.origin_mm,
                        direction=volume.direction, source_files=(), source_frames=(),
                        sop_instance_uids=(),
                        slice_positions_mm=tuple(float(v) for v in grid.z_positions_mm - src_z[0]))
    voxel_ml = pz * pr * pc / 1000.0
    min_vox = max(1, int(opt.min_lung_ml / voxel_ml))
    sup = superior_sign(volume)

    air = small < opt.air_hu
    for kk in range(air.shape[0]):
        lab, n = ndimage.label(air[kk])
        if n:
            border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
            air[kk][np.isin(lab, border[border > 0])] = False
    comps = _keep_lungs(air, min_vox, opt.second_lung_fraction, sup)
    lung = comps > 0

    airway = np.zeros(lung.shape, bool)
    max_area_px = opt.airway_max_area_mm2 / (pr * pc)
    for k in np.nonzero(lung.any(axis=(1, 2)))[0]:
        lab, n_lab = ndimage.label(lung[k])
        if n_lab == 0:
            continue
        flat = lab.ravel()
        area = np.bincount(flat, minlength=n_lab + 1)[1:]
        # median HU below the threshold <=> more than half of the pixels below it
        below = np.bincount(flat, weights=(small[k] < opt.airway_median_hu).ravel(),
                            minlength=n_lab + 1)[1:]
        tube = np.nonzero((area < max_area_px) & (below > 0.5 * area))[0] + 1
        if tube.size:
            hit = np.isin(lab, tube)
            lung[k][hit] = False
            airway[k] |= hit
    comps = _keep_lungs(lung, min_vox, opt.second_lung_fraction, sup)
    lung = comps > 0
    labels_small = split_left_right(lung, work, 1, comps)

    radius_px = opt.closing_mm / max(pr, pc)
    right = _close_and_fill(labels_small == LUNG_RIGHT, radius_px)
    left = _close_and_fill(labels_small == LUNG_LEFT, radius_px)
    both = right & left  # closing of one lung reached into the other: keep the original label
    merged = np.zeros(lung.shape, np.uint8)
    merged[right] = LUNG_RIGHT
    merged[left] = LUNG_LEFT
    merged[both] = np.where(labels_small[both] > 0, labels_small[both], LUNG_RIGHT)
    labels_small = merged
    airway &= labels_small == 0

    body = body_mask(small, step=1) | (labels_small > 0)
    return ThresholdLungs(labels=labels_to_source(labels_small, grid),
                          airway=labels_to_source(airway.astype(np.uint8), grid).astype(bool),
                          body=labels_to_source(body.astype(np.uint8), grid).astype(bool))


def lung_base_cut(
    mask: npt.NDArray[np.bool_], reference: npt.NDArray[np.bool_], volume: SeriesVolume,
    margin_mm: float = 10.0,
) -> int:
    """Clear ``mask`` in slices caudal to the reference lungs' base, in place.

    The lung base is the most caudal slice holding reference lung (the deepest point of the
    costophrenic recesses); slices more than ``margin_mm`` below it are below the diaphragm.

    Parameters
    ----------
    mask:
        Boolean mask on the source grid (modified in place).
    reference:
        Boolean lung mask defining the base (the threshold lungs).
    volume:
        Source geometry.
    margin_mm:
        Tolerance below the base.

    Returns
    -------
    int
        Number of voxels cleared.
    """
    sup = superior_sign(volume)
    zs = np.nonzero(reference.any(axis=(1, 2)))[0]
    if sup == 0.0 or zs.size == 0:
        return 0
    height = volume.slice_positions() * sup  # increases towards the head
    base = float(height[zs].min())
    below = np.nonzero(height < base - margin_mm)[0]
    cleared = int(np.count_nonzero(mask[below]))
    mask[below] = False
    return cleared


def anatomical_lung_mask(
    model_lung: npt.NDArray[np.bool_], reference: ThresholdLungs, volume: SeriesVolume,
    options: LungMaskOptions | None = None,
) -> npt.NDArray[np.uint8]:
    """Apply the anatomy rules (module docstring) to a model's lung class and split it L/R.

    Parameters
    ----------
    model_lung:
        Boolean lung mask from a network, source grid.
    reference:
        The threshold lungs of the same volume (:func:`threshold_lungs`).
    volume:
        The series in HU.
    options:
        Thresholds (:class:`LungMaskOptions`).

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels (0, 1 right, 2 left) on the source grid; the threshold labels when the
        model's mask has nothing left or the threshold found no lungs.
    """
    opt = options or LungMaskOptions()
    ref = reference.labels > 0
    if not ref.any():
        return split_left_right(model_lung, volume)
    lung = model_lung.copy()
    if opt.air_tolerance_px > 0:
        grown = ndimage.binary_dilation(ref, np.ones((1, 3, 3), bool),
                                        iterations=opt.air_tolerance_px)
    else:
        grown = ref
    lung &= ~((volume.hu < opt.air_hu) & ~grown)  # air the threshold lungs do not hold
    lung &= ~reference.airway
    lung_base_cut(lung, ref, volume, opt.base_margin_mm)
    lab, n = ndimage.label(lung)
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        overlap = np.bincount(lab.ravel(), weights=ref.ravel(), minlength=n + 1)
        keep = (overlap >= 0.05 * sizes) & (sizes >= 1)
        keep[0] = False
        lung = keep[lab]
    if not lung.any():
        return reference.labels
    return split_left_right(lung, volume)
