"""Colours in screenshots (CIELab → RGB, hue masks, the rendered lung region) and the ground
truth read back from the SEG in Orthanc."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools.ohif_proof.common import RGB, ImageU8, Mask, dark_inside_body


def cielab_to_rgb(lab16: Sequence[int]) -> RGB:
    """DICOM RecommendedDisplayCIELabValue (0..65535 scaled) → sRGB 0..255."""
    import highdicom as hd

    rgb = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in lab16)).to_rgb()
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def hue_deg(rgb: Sequence[float]) -> float:
    """Hue of an RGB colour in degrees."""
    h, _, _ = colorsys.rgb_to_hsv(*(float(c) / 255.0 for c in rgb))
    return h * 360.0


def colour_mask(image: ImageU8, rgb: RGB, hue_tol: float = 25.0, min_chroma: int = 40) -> Mask:
    """Pixels of ``image`` (H×W×3) that show segment colour ``rgb``, blended or not.

    OHIF draws a segment as its colour blended over the grey CT (fill) plus an opaque outline; both
    keep the colour's hue, while the CT and the UI text are grey (no chroma). A pixel counts when its
    chroma (max − min channel) is at least ``min_chroma`` and its hue is within ``hue_tol`` degrees of
    the segment colour's hue. Where two segments overlap (infiltrate inside the lung) OHIF blends
    both fills: orange (19°) over light blue comes out near 0° — hence the 25° default tolerance,
    fine for colours as far apart in hue as lungnode's (216° and 19°).
    """
    img = image[..., :3].astype(np.float32)
    mx, mn = img.max(axis=-1), img.min(axis=-1)
    chroma = mx - mn
    safe = np.where(chroma == 0, 1.0, chroma)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    h = np.where(mx == r, ((g - b) / safe) % 6.0,
                 np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
    diff = np.abs(((h - hue_deg(rgb)) + 180.0) % 360.0 - 180.0)
    return np.asarray((chroma >= min_chroma) & (diff <= hue_tol), dtype=bool)


def rendered_lung_region(image: ImageU8, dark: int = 60) -> Mask:
    """The lungs as rendered on a grey CT screenshot: dark pixels enclosed by the bright body.

    The body is the largest connected bright region (grey value above ``dark``) with its holes
    filled; the lungs are the dark pixels inside it (small specks dropped).
    """
    grey = image[..., :3].astype(np.float32).mean(axis=-1)
    return dark_inside_body(grey > dark)


def load_png(path: Path) -> ImageU8:
    """A PNG as an H×W×3 uint8 array."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class SegTruth:
    """What a SEG says, per source SOP Instance UID and segment label."""

    series_uid: str
    series_description: str
    colours: dict[str, RGB]
    #: masks[sop_uid][label] → rows×columns bool (only frames present in the SEG)
    masks: dict[str, dict[str, Mask]]

    def labels_on(self, sop_uid: str) -> set[str]:
        """Segment labels with at least one pixel on the source image ``sop_uid``."""
        return {label for label, m in self.masks.get(sop_uid, {}).items() if m.any()}


def read_seg_truth(datasets: Sequence[Any]) -> SegTruth:
    """Colours and masks of one SEG series (one or more instances)."""
    colours: dict[str, RGB] = {}
    masks: dict[str, dict[str, Mask]] = {}
    for ds in datasets:
        labels = {}
        for item in ds.SegmentSequence:
            labels[int(item.SegmentNumber)] = str(item.SegmentLabel)
            if "RecommendedDisplayCIELabValue" in item:
                colours[str(item.SegmentLabel)] = cielab_to_rgb(item.RecommendedDisplayCIELabValue)
        frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
        for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            label = labels[int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
            sop = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            masks.setdefault(sop, {})[label] = frames[i].astype(bool)
    first = datasets[0]
    return SegTruth(str(first.SeriesInstanceUID), str(first.get("SeriesDescription", "")), colours,
                    masks)
