"""The one-page summary: a 1024 x 1448 RGB page (A4 proportions) for the radiologist's minute.

Contents, top to bottom: title and "NOT FOR PRIMARY DIAGNOSIS"; patient and study; the
impression sentence; the region table (lung and opacity volumes, PO, PHO, ground glass,
consolidation, score, prior PO and change); a coronal reformat with the regions tinted and the
lung and infiltrate outlined, with the levels of four key axial slices marked; those four axial
slices; a legend; the model, the region rule and the scoring scheme.

Pillow and numpy only (matplotlib is not a run-time dependency). Text uses Pillow's built-in
scalable font, so the page looks the same on every install. Rendering a 300-slice series takes
well under a second on one core (``bench/summary.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from lungnode.inference.comparison import Comparison, format_date, impression
from lungnode.inference.regions import cranial_heights
from lungnode.inference.severity import RegionStats, SeverityReport
from lungnode.inference.types import InferenceResult
from lungnode.node.results.sc import NOT_FOR_DIAGNOSIS, lung_window, outline
from lungnode.node.results.seg import INFILTRATE_RGB, LUNG_RGB

__all__ = ["LEVEL_RGB", "PAGE_SIZE", "PageText", "coronal_row", "key_slices", "level_colours",
           "overlay",
           "render_summary"]

#: Page width and height in pixels.
PAGE_SIZE = (1024, 1448)
#: Tint of each region level (upper, middle, lower) on the pictures.
LEVEL_RGB = {"upper": (70, 130, 255), "middle": (60, 200, 110), "lower": (240, 190, 40)}
TINT = 0.30
BG = (18, 18, 22)
FG = (235, 235, 235)
DIM = (160, 160, 170)
WARN = (255, 220, 0)
MARGIN = 16


@dataclass(frozen=True)
class PageText:
    """Patient, study and producer text printed on the page.

    Attributes
    ----------
    patient_name, patient_id, study_date, accession, series_description:
        From the source series.
    model_label:
        ``"name version"`` of the model.
    software:
        lungnode's version.
    """

    patient_name: str = ""
    patient_id: str = ""
    study_date: str = ""
    accession: str = ""
    series_description: str = ""
    model_label: str = ""
    software: str = ""


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def key_slices(result: InferenceResult, count: int = 4) -> list[int]:
    """Slices to show: the most involved slices, at least a tenth of the lungs' height apart,
    then evenly spaced lung levels; ordered cranial to caudal.

    Parameters
    ----------
    result:
        Masks and geometry.
    count:
        How many slices.

    Returns
    -------
    list of int
        Slice indices (fewer when the lungs span fewer slices).
    """
    heights = cranial_heights(result.volume)
    lung_rows = np.flatnonzero(result.lung_labels.any(axis=(1, 2)))
    if lung_rows.size == 0:
        lung_rows = np.arange(result.lung_labels.shape[0])
    top, bottom = heights[lung_rows].max(), heights[lung_rows].min()
    gap = 0.1 * (top - bottom)
    area = np.count_nonzero(result.infiltrate[lung_rows], axis=(1, 2))
    chosen: list[int] = []
    for i in np.argsort(-area, kind="stable"):
        if area[i] == 0 or len(chosen) == count:
            break
        k = int(lung_rows[i])
        if all(abs(heights[k] - heights[c]) >= gap for c in chosen):
            chosen.append(k)
    for frac in (0.2, 0.4, 0.6, 0.8, 0.3, 0.5, 0.7):
        if len(chosen) >= min(count, lung_rows.size):
            break
        target = top - frac * (top - bottom)
        k = int(lung_rows[np.argmin(np.abs(heights[lung_rows] - target))])
        if k not in chosen and all(abs(heights[k] - heights[c]) >= gap / 2 for c in chosen):
            chosen.append(k)
    return sorted(chosen, key=lambda k: -heights[k])


def coronal_row(lung: npt.NDArray[np.bool_], infiltrate: npt.NDArray[np.bool_]) -> int:
    """Image row of the coronal reformat: through the infiltrate's centre when there is one,
    else through the lungs' centre."""
    mask = infiltrate if infiltrate.any() else lung
    weights = np.count_nonzero(mask, axis=(0, 2)).astype(np.float64)
    if weights.sum() == 0:
        return lung.shape[1] // 2
    return round(float(weights @ np.arange(weights.size)) / float(weights.sum()))


def level_colours(report: SeverityReport) -> npt.NDArray[np.uint8]:
    """Colour per region label (index 0 unused)."""
    table = np.zeros((len(report.regions) + 1, 3), np.uint8)
    for i, r in enumerate(report.regions, start=1):
        table[i] = LEVEL_RGB.get(r.level, (200, 200, 200))
    return table


def overlay(hu: npt.NDArray[np.float32], regions: npt.NDArray[np.uint8] | None,
             lung: npt.NDArray[np.bool_], infiltrate: npt.NDArray[np.bool_],
             colours: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Lung-window RGB of one plane: regions tinted by ``colours[label]``, lung and infiltrate
    outlined."""
    gray = lung_window(hu).astype(np.float32)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    if regions is not None:
        inside = regions > 0
        rgb[inside] = (1 - TINT) * rgb[inside] + TINT * colours[regions[inside]]
    out = rgb.astype(np.uint8)
    out[outline(lung)] = LUNG_RGB
    out[outline(infiltrate)] = INFILTRATE_RGB
    return out


def _fit(rgb: npt.NDArray[np.uint8], width_mm: float, height_mm: float,
         box: tuple[int, int]) -> Image.Image:
    """Resize to the box keeping the physical aspect ratio."""
    scale = min(box[0] / width_mm, box[1] / height_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return Image.fromarray(rgb, mode="RGB").resize(size, Image.Resampling.BILINEAR)


def _side_letters(result: InferenceResult) -> tuple[str, str]:
    """Patient side shown at the image's left and right edge (row direction's x)."""
    x = result.volume.direction[0][0]
    return ("R", "L") if x >= 0 else ("L", "R")


def _fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _row_cells(r: RegionStats, comparison: Comparison | None, report: SeverityReport,
               show_score: bool) -> list[str]:
    prior = change = "-"
    if comparison is not None and comparison.prior is not None:
        if r.key in ("right", "left"):
            pass
        elif r.key == "both":
            prior, change = _fmt(comparison.prior.po), _fmt(comparison.po_change(report),
                                                              signed=True)
        elif r.key in comparison.prior.region_po:
            prior = _fmt(comparison.prior.region_po[r.key])
            change = _fmt(comparison.region_change(report, r.key), signed=True)
    score = str(r.score) if show_score else ""
    return [r.name, f"{r.lung_ml:.0f}", f"{r.infiltrate_ml:.1f}", f"{r.po:.1f}", f"{r.pho:.1f}",
            f"{r.ground_glass_ml:.1f}", f"{r.consolidation_ml:.1f}", score, prior, change]


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
          width: int) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def _table(draw: ImageDraw.ImageDraw, y: int, report: SeverityReport,
           comparison: Comparison | None) -> int:
    font, bold = _font(17), _font(18)
    headers = ["Region", "Lung mL", "Opacity mL", "PO %", "PHO %", "GGO mL", "Cons. mL",
               "Score", "Prior PO", "Change pp"]
    widths = [196, 84, 104, 70, 74, 86, 92, 64, 92, 98]
    x0 = MARGIN
    row_h = 27
    draw.rectangle((x0, y, PAGE_SIZE[0] - MARGIN, y + row_h), fill=(45, 45, 58))
    x = x0 + 6
    for h, w in zip(headers, widths, strict=True):
        draw.text((x, y + 4), h, fill=FG, font=font)
        x += w
    y += row_h
    rows = [(r, True) for r in report.regions] + [(report.right, True), (report.left, True),
                                                   (report.both, True)]
    for i, (r, show) in enumerate(rows):
        lung_row = r.key in ("right", "left", "both")
        fill = (34, 34, 44) if i % 2 else (26, 26, 34)
        if lung_row:
            fill = (40, 48, 64)
        draw.rectangle((x0, y, PAGE_SIZE[0] - MARGIN, y + row_h), fill=fill)
        if r.level:
            draw.rectangle((x0, y + 4, x0 + 5, y + row_h - 4), fill=LEVEL_RGB.get(r.level, FG))
        x = x0 + 12
        cells = _row_cells(r, comparison, report, show)
        if r.key == "both":
            cells[7] = f"{report.total_score}/{report.max_score}"
        for j, (cell, w) in enumerate(zip(cells, widths, strict=True)):
            colour = FG
            if j == 9 and cell not in ("-", ""):
                value = float(cell)
                colour = (255, 130, 100) if value >= 1 else (120, 220, 140) if value <= -1 else FG
            draw.text((x, y + 4), cell, fill=colour, font=bold if lung_row else font)
            x += w if j else w - 6
        y += row_h
    return y


def render_summary(result: InferenceResult, report: SeverityReport, text: PageText,
                   comparison: Comparison | None = None) -> npt.NDArray[np.uint8]:
    """Render the page.

    Parameters
    ----------
    result:
        Masks and the HU volume.
    report:
        Figures per region (with ``labels`` for the pictures).
    text:
        Patient, study and producer text.
    comparison:
        The prior exam's figures, or why there are none.

    Returns
    -------
    numpy.ndarray
        ``uint8`` RGB ``(1448, 1024, 3)``.
    """
    width, height = PAGE_SIZE
    page = Image.new("RGB", PAGE_SIZE, BG)
    draw = ImageDraw.Draw(page)
    # title
    draw.rectangle((0, 0, width, 64), fill=(30, 40, 70))
    draw.text((MARGIN, 14), "AI lung CT report: pneumonia extent", fill=FG, font=_font(30))
    warn = _font(24)
    draw.text((width - MARGIN - draw.textlength(NOT_FOR_DIAGNOSIS, font=warn), 18),
              NOT_FOR_DIAGNOSIS, fill=WARN, font=warn)
    # patient and study
    small = _font(17)
    y = 74
    line = (f"{text.patient_name}   ID {text.patient_id or '(none)'}   "
            f"Study {format_date(text.study_date) or '(no date)'}   Acc. {text.accession or '-'}")
    draw.text((MARGIN, y), line, fill=FG, font=_font(19))
    y += 26
    draw.text((MARGIN, y), f"Series: {text.series_description or '-'}", fill=DIM, font=small)
    y += 32
    # impression
    imp_font = _font(21)
    for wrapped in _wrap(draw, impression(report, comparison), imp_font, width - 2 * MARGIN):
        draw.text((MARGIN, y), wrapped, fill=(255, 255, 255), font=imp_font)
        y += 28
    y += 8
    y = _table(draw, y, report, comparison) + 14
    # pictures
    vol = result.volume
    colours = level_colours(report)
    lung = result.lung_labels > 0
    heights = cranial_heights(vol)
    order = np.argsort(-heights, kind="stable")
    keys = key_slices(result)
    row = coronal_row(lung, result.infiltrate)
    labels = report.labels
    coronal = overlay(vol.hu[order, row, :], None if labels is None else labels[order, row, :],
                       lung[order, row, :], result.infiltrate[order, row, :], colours)
    _, dr, dc = vol.spacing_mm
    extent_z = float(heights.max() - heights.min()) + vol.spacing_mm[0]
    label_font = _font(16)
    left, _ = _side_letters(result)
    draw.text((MARGIN, y), f"Coronal reformat (patient {left} on the left)", fill=DIM,
              font=label_font)
    draw.text((width // 2 + 4, y), "Key axial slices (levels marked on the coronal)", fill=DIM,
              font=label_font)
    y += 24
    pic_h = height - y - 150
    cor = _fit(coronal, vol.hu.shape[2] * dc, extent_z, (width // 2 - MARGIN - 8, pic_h))
    page.paste(cor, (MARGIN, y))
    z_scale = cor.height / extent_z
    for n, k in enumerate(keys, start=1):
        yy = y + int((heights.max() - heights[k] + vol.spacing_mm[0] / 2) * z_scale)
        draw.line((MARGIN, yy, MARGIN + 14, yy), fill=WARN, width=2)
        draw.line((MARGIN + cor.width - 14, yy, MARGIN + cor.width, yy), fill=WARN, width=2)
        draw.text((MARGIN + 18, yy - 9), str(n), fill=WARN, font=label_font)
    if report.carina_index is not None:
        yy = y + int((heights.max() - heights[report.carina_index]) * z_scale)
        for xx in range(MARGIN, MARGIN + cor.width, 12):
            draw.line((xx, yy, xx + 6, yy), fill=(255, 255, 255), width=1)
        draw.text((MARGIN + cor.width - 60, yy - 18), "carina", fill=FG, font=_font(14))
    cell = (width - (width // 2) - MARGIN - 8) // 2
    x_ax = width // 2 + 4
    for n, k in enumerate(keys[:4]):
        ax = overlay(vol.hu[k], None if labels is None else labels[k], lung[k],
                      result.infiltrate[k], colours)
        img = _fit(ax, vol.hu.shape[2] * dc, vol.hu.shape[1] * dr, (cell - 4, cell - 4))
        px, py = x_ax + (n % 2) * cell, y + (n // 2) * (cell + 22)
        page.paste(img, (px, py))
        region = ""
        if labels is not None and labels[k].any():
            counts = np.bincount(labels[k].ravel(), minlength=len(report.regions) + 1)[1:]
            levels = {report.regions[i].level for i in np.flatnonzero(counts)}
            region = "/".join(lv for lv in ("upper", "middle", "lower") if lv in levels)
        draw.text((px + 4, py + 2), f"{n + 1}", fill=WARN, font=label_font)
        draw.text((px + 4, py + img.height + 2), f"axial {n + 1}: {region}", fill=DIM,
                  font=_font(14))
    # legend under the axial slices
    ly = y + 2 * (cell + 22) + 8
    legend_font = _font(16)
    items: Sequence[tuple[tuple[int, int, int], str, bool]] = (
        (LUNG_RGB, "lung outline", False), (INFILTRATE_RGB, "opacity (infiltrate) outline", False),
        (LEVEL_RGB["upper"], f"upper {report.region_kind[:-1]}", True),
        (LEVEL_RGB["middle"], f"middle {report.region_kind[:-1]}", True),
        (LEVEL_RGB["lower"], f"lower {report.region_kind[:-1]}", True))
    for i, (colour, label, filled) in enumerate(items):
        lx, yy = x_ax + (i % 2) * cell, ly + (i // 2) * 24
        draw.rectangle((lx, yy + 3, lx + 14, yy + 17), outline=colour, width=2,
                       fill=colour if filled else None)
        draw.text((lx + 22, yy), label, fill=FG, font=legend_font)
    # footer
    fy = height - 140
    draw.line((MARGIN, fy - 8, width - MARGIN, fy - 8), fill=(70, 70, 80), width=1)
    foot = _font(15)
    notes = [
        f"Regions: {report.rule_text}.",
        f"Score: {report.scheme.title}; total {report.max_score} on "
        f"{len(report.regions)} {report.region_kind}. PO = opacity / lung volume; PHO = opacity "
        f"above {report.pho_min_hu:.0f} HU / lung volume (Chaganti 2020). GGO -750 to -300 HU; "
        "consolidation from -300 HU.",
        f"Model {text.model_label}; lungnode {text.software}. Automated measurement: "
        f"{NOT_FOR_DIAGNOSIS}; review the images.",
    ]
    if comparison is not None and comparison.prior is not None:
        notes.insert(0, f"Prior: study of {format_date(comparison.prior.study_date)} "
                        f"({comparison.prior.source}).")
    elif comparison is not None:
        notes.insert(0, f"Prior: {comparison.note}")
    for note in notes:
        for wrapped in _wrap(draw, note, foot, width - 2 * MARGIN):
            draw.text((MARGIN, fy), wrapped, fill=DIM, font=foot)
            fy += 19
    return np.asarray(page, dtype=np.uint8)
