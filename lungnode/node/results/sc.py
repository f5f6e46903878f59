"""Burned-in overlay fallback: a Secondary Capture series for PACS that cannot show a SEG.

One RGB Secondary Capture image per source slice: the CT in a lung window (width 1500, level
-600), lung outlines in light blue and infiltrate outlines in orange-red burned into the pixels,
a legend, the model and the words "NOT FOR PRIMARY DIAGNOSIS" (also in ImageComments, and
BurnedInAnnotation = YES). Each image references its source slice (Source Image Sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from lungnode.inference.types import InferenceResult
from lungnode.node.results.common import OutputContext, SourceSeries, finish_output, new_uid
from lungnode.node.results.seg import INFILTRATE_RGB, LUNG_RGB

WINDOW_LEVEL = -600.0
WINDOW_WIDTH = 1500.0
NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"


def lung_window(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Map HU to 0-255 with the lung window."""
    low = WINDOW_LEVEL - WINDOW_WIDTH / 2
    scaled = (hu.astype(np.float32) - low) * (255.0 / WINDOW_WIDTH)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Boundary pixels of a 2D mask (mask minus its 4-neighbour erosion), two pixels wide."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1)
    eroded = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
              & padded[1:-1, :-2] & padded[1:-1, 2:])
    edge = m & ~eroded
    p = np.pad(edge, 1)
    return np.asarray(edge | p[:-2, 1:-1] | p[1:-1, :-2], dtype=bool)


def _orientation_letters(vector: Sequence[float]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    axis = int(np.argmax(np.abs(vector)))
    return letters[axis][0] if vector[axis] > 0 else letters[axis][1]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def render_slice(hu: npt.NDArray[np.float32], lung: npt.NDArray[np.bool_],
                 infiltrate: npt.NDArray[np.bool_], model_label: str) -> npt.NDArray[np.uint8]:
    """One RGB overlay image ``(rows, columns, 3)``: windowed CT, outlines, legend, warning."""
    gray = lung_window(hu)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgb[outline(lung)] = LUNG_RGB
    rgb[outline(infiltrate)] = INFILTRATE_RGB
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    size = max(10, hu.shape[0] // 40)
    font = _font(size)
    x, y = 6, 6
    for colour, text in ((LUNG_RGB, "Lung"), (INFILTRATE_RGB, "Infiltrate")):
        draw.rectangle((x, y + 2, x + size, y + size), outline=colour, width=2)
        draw.text((x + size + 6, y), text, fill=colour, font=font)
        y += size + 6
    draw.text((x, y), f"AI {model_label}", fill=(255, 255, 255), font=font)
    draw.text((x, hu.shape[0] - size - 8), NOT_FOR_DIAGNOSIS, fill=(255, 255, 0), font=font)
    return np.asarray(image, dtype=np.uint8)


def build_sc_series(result: InferenceResult, source: SourceSeries, ctx: OutputContext, *,
                    series_uid: str | None = None, description_suffix: str = "") -> list[Dataset]:
    """Build one Secondary Capture image per source slice.

    Parameters
    ----------
    result:
        Masks and the HU volume.
    source:
        Source headers sorted like the masks.
    ctx:
        Producer identity.
    series_uid:
        SC series UID (fresh when ``None``).
    description_suffix:
        Appended to the series description.

    Returns
    -------
    list of Dataset
        ``len(source.datasets)`` images, InstanceNumber 1..n in slice order.
    """
    series_uid = series_uid or new_uid()
    first = source.first
    orientation = [float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    patient_orientation = (_orientation_letters(orientation[:3]),
                           _orientation_letters(orientation[3:]))
    lung = result.lung_labels > 0
    images: list[Dataset] = []
    for k, src in enumerate(source.datasets):
        pixels = render_slice(result.volume.hu[k], lung[k], result.infiltrate[k], ctx.model_label)
        sc = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=source.study_uid,
            series_instance_uid=series_uid,
            series_number=ctx.series_number("sc"),
            sop_instance_uid=new_uid(),
            instance_number=k + 1,
            manufacturer=ctx.manufacturer,
            patient_orientation=patient_orientation,
            pixel_spacing=((float(src.PixelSpacing[0]), float(src.PixelSpacing[1]))
                           if "PixelSpacing" in src else None),
            transfer_syntax_uid=str(ExplicitVRLittleEndian),
        )
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}. AI overlay, model {ctx.model_label}"[:10240]
        sc.DerivationDescription = "Lung and infiltrate outlines burned into lung-window CT"
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.Laterality = ""  # General Series type 2C (dciodvfy asks for it on SC)
        finish_output(sc, source, ctx,
                      series_description=f"AI overlay NOT FOR DIAGNOSIS{description_suffix}")
        images.append(sc)
    return images
