"""DICOM Segmentation (BINARY) of the lungs and the infiltrate, built with highdicom.

Segments
--------
1. ``Lung``: category SCT 91723000 *Anatomical Structure*, type SCT 39607008 *Lung*
   (both lungs; left/right are separated in the SR).
2. ``Infiltrate``: category SCT 49755003 *Morphologically Abnormal Structure*, type DCM 112121
   *Infiltrate*, anatomic region SCT 39607008 *Lung*.

Each segment carries algorithm identification (model name and version from the checkpoint), a
tracking UID and a display colour. The SEG is on the source grid: same Frame of Reference, one
frame per source slice and segment, referencing the source series and instances.

Per destination (:class:`SegOptions`): empty frames kept or omitted (kept by default: OHIF
misplaces segments otherwise), one SEG for both segments or one per segment, Explicit VR Little
Endian or JPEG 2000 lossless, and a frame budget: a SEG with more frames is split into slabs of
consecutive slices (Weasis hides SEGs over 400 frames).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from lungnode.node.results.common import (
    MODEL_NAME,
    OutputContext,
    SourceSeries,
    algorithm_identification,
    contributing_equipment,
    finish_output,
    new_uid,
)

log = logging.getLogger(__name__)

#: Frame count above which Weasis 4.6 does not display a SEG.
WEASIS_FRAME_LIMIT = 400

_warned: set[bool] = set()

TRANSFER_SYNTAXES = {"explicit": str(ExplicitVRLittleEndian), "jpeg2000": str(JPEG2000Lossless)}


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: its mask and description fields."""

    key: str
    label: str
    category: hd.sr.CodedConcept
    property_type: hd.sr.CodedConcept
    rgb: tuple[int, int, int]
    anatomic_region: hd.sr.CodedConcept | None
    mask: npt.NDArray[np.bool_]
    tracking_uid: str


@dataclass(frozen=True)
class SegOptions:
    """Per-destination SEG settings (from :class:`lungnode.config.DestinationConfig`)."""

    transfer_syntax: str = "explicit"
    omit_empty_frames: bool = False
    one_seg_per_segment: bool = False
    max_frames_per_seg: int = 0


def _cc(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


LUNG_CATEGORY = _cc(codes.SCT.AnatomicalStructure)
LUNG_TYPE = _cc(codes.SCT.Lung)
INFILTRATE_CATEGORY = _cc(codes.SCT.MorphologicallyAbnormalStructure)
INFILTRATE_TYPE = _cc(codes.DCM.Infiltrate)
#: Display colours (RGB): lung light blue, infiltrate orange-red.
LUNG_RGB = (128, 174, 255)
INFILTRATE_RGB = (255, 80, 0)


def segment_specs(lung_mask: npt.NDArray[np.bool_], infiltrate: npt.NDArray[np.bool_],
                  tracking_uids: Sequence[str] | None = None) -> list[SegmentSpec]:
    """The two segments (lung, infiltrate) with fresh tracking UIDs unless given.

    Parameters
    ----------
    lung_mask:
        Both lungs, ``(slices, rows, columns)`` on the source grid.
    infiltrate:
        Infiltrate mask on the same grid.
    tracking_uids:
        Tracking UIDs of lung and infiltrate (fresh UIDs when ``None``).
    """
    uids = list(tracking_uids) if tracking_uids else [new_uid(), new_uid()]
    return [
        SegmentSpec("lung", "Lung", LUNG_CATEGORY, LUNG_TYPE, LUNG_RGB, None, lung_mask, uids[0]),
        SegmentSpec("infiltrate", "Infiltrate", INFILTRATE_CATEGORY, INFILTRATE_TYPE, INFILTRATE_RGB,
                    LUNG_TYPE, infiltrate, uids[1]),
    ]


def _description(number: int, spec: SegmentSpec, ctx: OutputContext) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=spec.label,
        segmented_property_category=spec.category,
        segmented_property_type=spec.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(ctx),
        tracking_uid=spec.tracking_uid,
        tracking_id=f"{spec.label} (job {ctx.job_id})",
        anatomic_regions=[spec.anatomic_region] if spec.anatomic_region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
    )


def _slabs(n_slices: int, n_segments: int, max_frames: int) -> list[tuple[int, int]]:
    if max_frames <= 0 or n_slices * n_segments <= max_frames:
        return [(0, n_slices)]
    per = max(1, max_frames // n_segments)
    return [(start, min(n_slices, start + per)) for start in range(0, n_slices, per)]


def build_segs(source: SourceSeries, specs: Sequence[SegmentSpec], ctx: OutputContext,
               options: SegOptions, *, series_uid: str | None = None,
               description_suffix: str = "") -> list[Dataset]:
    """Build the SEG instance(s) for one destination profile.

    Parameters
    ----------
    source:
        Source headers sorted like the masks.
    specs:
        Segments (see :func:`segment_specs`).
    ctx:
        Producer identity.
    options:
        Per-destination settings.
    series_uid:
        Series Instance UID of the SEG series (fresh when ``None``); all parts share it.
    description_suffix:
        Appended to the series description (e.g. when replacing an earlier result).

    Returns
    -------
    list of Dataset
        One SEG, or several (one per segment and/or per slab), InstanceNumber 1..n.
    """
    ts = TRANSFER_SYNTAXES[options.transfer_syntax]
    series_uid = series_uid or new_uid()
    groups: list[list[SegmentSpec]] = ([[s] for s in specs] if options.one_seg_per_segment
                                       else [list(specs)])
    n = len(source.datasets)
    out: list[Dataset] = []
    for group in groups:
        slabs = _slabs(n, len(group), options.max_frames_per_seg)
        frames = n * len(group)
        if options.max_frames_per_seg == 0 and frames > WEASIS_FRAME_LIMIT and not _warned:
            _warned.add(True)  # once per process: it is a property of the configuration
            log.warning("SEG with %d frames (over %d): Weasis will not show it; set "
                        "max_frames_per_seg for this destination to split", frames,
                        WEASIS_FRAME_LIMIT)
        descriptions = [_description(i + 1, spec, ctx) for i, spec in enumerate(group)]
        for start, stop in slabs:
            # highdicom gets its own copy (its FRACTIONAL path overwrites the input). Segments are
            # stacked on axis 0 (a plain copy) and moved last as a view: highdicom's overlap
            # check (sum over segments) and its per-segment frames then read contiguous planes,
            # several times faster than an interleaved (..., segments) array.
            stacked = np.stack([np.asarray(s.mask[start:stop], dtype=np.uint8) for s in group])
            pixels = np.moveaxis(stacked, 0, -1)
            seg = hd.seg.Segmentation(
                source_images=list(source.datasets[start:stop]),
                pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=ctx.series_number("seg"),
                sop_instance_uid=new_uid(),
                instance_number=len(out) + 1,
                manufacturer=ctx.manufacturer,
                manufacturer_model_name=MODEL_NAME,
                software_versions=ctx.software_version,
                device_serial_number=ctx.station_ae,
                content_label="LUNGSEG",
                content_description="Lungs and COVID-19 infiltrate"[:64],
                content_creator_name="lungnode^automatic",
                transfer_syntax_uid=ts,
                omit_empty_frames=options.omit_empty_frames,
                contributing_equipment=[contributing_equipment(ctx)],
            )
            # One series for every part: SeriesDescription is a series-level attribute.
            finish_output(seg, source, ctx,
                          series_description=f"AI lung + infiltrate SEG{description_suffix}")
            out.append(seg)
    return out
