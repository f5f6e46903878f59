"""A SEG made with highdicom from a threshold lung mask, for developing the screenshot checks
without the node (``--source harness``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tools.ohif_proof.common import RGB, Mask, dark_inside_body

#: Colours of the harness SEG (the node's own SEG carries its colours; the checks read them from it).
HARNESS_LUNG_RGB: RGB = (128, 174, 255)
HARNESS_INFILTRATE_RGB: RGB = (255, 80, 0)


def threshold_lung_mask(hu: npt.NDArray[np.floating[Any]]) -> Mask:
    """A crude lung mask of one axial slice in HU: air (< -400 HU) enclosed by the body.

    The body is the largest connected region above -400 HU with its holes filled; lungs are the air
    inside it, minus components under 1 % of the slice (airways, bowel gas).
    """
    from scipy import ndimage

    air = dark_inside_body(hu > -400)
    labels, n = ndimage.label(air)
    keep = np.zeros(hu.shape, dtype=bool)
    for i in range(1, n + 1):
        comp = labels == i
        if comp.sum() > 0.01 * hu.size:
            keep |= comp
    return keep


@dataclass(frozen=True)
class HarnessSeg:
    """The harness SEG and what is in it."""

    path: Path
    series_uid: str
    #: Slice indices (sorted source order, foot → head as in the series) with lung / infiltrate.
    lung_slices: tuple[int, ...]
    infiltrate_slices: tuple[int, ...]


def sorted_ct(ct_dir: Path) -> list[Any]:
    """The CT datasets of ``ct_dir`` sorted along the slice normal (ascending position)."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in sorted(ct_dir.glob("*.dcm"))]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(datasets, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient))))


def make_harness_seg(ct_dir: Path, out: Path, slices: range | None = None,
                     shift: int = 0) -> HarnessSeg:
    """A BINARY SEG (Lung, Infiltrate) on ``ct_dir`` made with highdicom, all frames kept.

    ``shift`` moves both masks that many columns to the right: a deliberately misplaced SEG, as a
    negative control of the screenshot checks.

    Lung: :func:`threshold_lung_mask` on ``slices`` (default: the middle half of the series), empty
    elsewhere. Infiltrate: a disc of 25 pixels radius inside the largest lung component on the
    middle third of those slices.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets = sorted_ct(ct_dir)
    n = len(datasets)
    slices = slices if slices is not None else range(n // 4, n - n // 4)
    lung = np.zeros((n, int(datasets[0].Rows), int(datasets[0].Columns)), dtype=bool)
    infil = np.zeros_like(lung)
    yy, xx = np.mgrid[: lung.shape[1], : lung.shape[2]]
    inner = list(slices)[len(slices) // 3: 2 * len(slices) // 3]
    for i in slices:
        ds = datasets[i]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        lung[i] = threshold_lung_mask(hu)
        if i in inner and lung[i].any():
            from scipy import ndimage

            dist = ndimage.distance_transform_edt(lung[i])
            cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
            infil[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 25 ** 2) & lung[i]

    if shift:
        lung = np.roll(lung, shift, axis=2)
        infil = np.roll(infil, shift, axis=2)

    def cc(code: Any) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)

    algo = hd.AlgorithmIdentificationSequence(name="viewer-proof threshold", version="1",
                                              family=cc(codes.DCM.ArtificialIntelligence))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="Lung",
            segmented_property_category=cc(codes.SCT.AnatomicalStructure),
            segmented_property_type=cc(codes.SCT.Lung),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            display_color=hd.color.CIELabColor.from_rgb(*HARNESS_LUNG_RGB)),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="Infiltrate",
            segmented_property_category=cc(codes.SCT.MorphologicallyAbnormalStructure),
            segmented_property_type=cc(codes.DCM.Infiltrate),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            display_color=hd.color.CIELabColor.from_rgb(*HARNESS_INFILTRATE_RGB)),
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=np.stack([lung, infil], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9900,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="lungnode viewer proof", manufacturer_model_name="harness",
        software_versions="0", device_serial_number="0",
        series_description="HARNESS lung + infiltrate SEG",
        omit_empty_frames=False,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return HarnessSeg(out, str(seg.SeriesInstanceUID),
                      tuple(int(i) for i in np.flatnonzero(lung.any(axis=(1, 2)))),
                      tuple(int(i) for i in np.flatnonzero(infil.any(axis=(1, 2)))))
