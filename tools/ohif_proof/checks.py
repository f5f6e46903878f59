"""What one screenshot of a slice shows: segment colours, where they sit on the rendered CT."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tools.ohif_proof.browser import ViewportState
from tools.ohif_proof.common import RGB, ImageU8, Mask
from tools.ohif_proof.images import SegTruth, colour_mask, rendered_lung_region


def resize_mask(mask: Mask, shape: tuple[int, int]) -> Mask:
    """Nearest-neighbour resize of a 2D mask to ``shape`` (rows, columns)."""
    rows = (np.arange(shape[0]) * mask.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * mask.shape[1] / shape[1]).astype(int)
    return np.asarray(mask[np.ix_(rows, cols)], dtype=bool)


@dataclass
class SliceCheck:
    """Measurements on one screenshot of one slice."""

    name: str
    sop_uid: str
    index: int
    screenshot: str
    expected_labels: list[str]
    colour_pixels: dict[str, int]
    #: share of each segment's coloured pixels inside the lungs of the rendered CT (if measured)
    inside_rendered_lungs: dict[str, float] = field(default_factory=dict)
    #: IoU of the coloured lung area (holes filled) and the SEG's lung mask, scaled onto the screen
    lung_iou: float | None = None
    #: mean absolute grey difference outside the overlay between this and the CT-only screenshot
    background_diff: float | None = None
    #: the displayed image on the screenshot: left, top, right, bottom (CSS pixels)
    image_box: tuple[float, float, float, float] | None = None


def colour_counts(crop: ImageU8, colours: dict[str, RGB], exclude: Mask | None = None) -> dict[str, int]:
    """Number of pixels of each segment colour in ``crop`` (``exclude`` pixels not counted)."""
    out = {}
    for label, rgb in colours.items():
        m = colour_mask(crop, rgb)
        if exclude is not None:
            m &= ~exclude
        out[label] = int(m.sum())
    return out


def analyse_seg_slice(name: str, state: ViewportState, page: ImageU8, ct_page: ImageU8 | None,
                      truth: SegTruth, shot: Path) -> SliceCheck:
    """Colour counts, overlap with the rendered lungs and with the SEG mask, for one slice."""
    from scipy import ndimage

    crop = state.crop(page)
    check = SliceCheck(name, state.sop_uid, state.index, str(shot),
                       sorted(truth.labels_on(state.sop_uid)), colour_counts(crop, truth.colours),
                       image_box=state.image_box)
    if ct_page is not None:
        ct_crop = state.crop(ct_page)
        lungs = ndimage.binary_dilation(rendered_lung_region(ct_crop), iterations=3)
        any_colour = np.zeros(crop.shape[:2], dtype=bool)
        for label, rgb in truth.colours.items():
            m = colour_mask(crop, rgb)
            any_colour |= m
            if m.sum():
                check.inside_rendered_lungs[label] = float((m & lungs).sum() / m.sum())
        outside = ~ndimage.binary_dilation(any_colour, iterations=2)
        diff = np.abs(crop.astype(np.int16) - ct_crop.astype(np.int16)).mean(axis=-1)
        check.background_diff = float(diff[outside].mean()) if outside.any() else None
    lung_label = next((lb for lb in truth.colours if lb.lower().startswith("lung")), None)
    if lung_label and state.sop_uid in truth.masks and lung_label in truth.masks[state.sop_uid]:
        expected = resize_mask(truth.masks[state.sop_uid][lung_label], crop.shape[:2])
        shown = ndimage.binary_fill_holes(colour_mask(crop, truth.colours[lung_label]))
        if expected.any() or shown.any():
            check.lung_iou = float((expected & shown).sum() / max((expected | shown).sum(), 1))
    return check
