"""Montage of the lung zones on the real chest CTs (``docs/img/report-regions.png``).

For every series in ``../shared/data/ct/real-chest``: the node's threshold lung mask, the zones of
:func:`lungnode.inference.regions.assign_zones` (carina rule or volume thirds) and a coronal
reformat through the lungs with the zones tinted (upper blue, middle green, lower amber) and the
carina level dashed; the caption names the rule used.

Usage: ``.venv/bin/python tools/region_montage.py [--out docs/img/report-regions.png]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lungnode.inference.dicom_io import find_series_files, read_series
from lungnode.inference.lungmask import threshold_lung_mask
from lungnode.inference.regions import ZONES, assign_zones, cranial_heights
from lungnode.node.results.summary_page import LEVEL_RGB, coronal_row, overlay

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
TILE = (300, 380)


def tile(folder: Path) -> Image.Image:
    """One captioned coronal tile."""
    vol = read_series(find_series_files(folder))
    lungs = threshold_lung_mask(vol)
    rm = assign_zones(vol, lungs)
    heights = cranial_heights(vol)
    order = np.argsort(-heights, kind="stable")
    row = coronal_row(lungs > 0, np.zeros(lungs.shape, bool))
    colours = np.zeros((len(ZONES) + 1, 3), np.uint8)
    for i, z in enumerate(ZONES, start=1):
        colours[i] = LEVEL_RGB[z.level]
    rgb = overlay(vol.hu[order, row, :], rm.labels[order, row, :], lungs[order, row, :] > 0,
                  np.zeros((len(order), lungs.shape[2]), bool), colours)
    extent = float(heights.max() - heights.min()) + vol.spacing_mm[0]
    width_mm = vol.hu.shape[2] * vol.spacing_mm[2]
    scale = min(TILE[0] / width_mm, (TILE[1] - 44) / extent)
    img = Image.fromarray(rgb).resize((round(width_mm * scale), round(extent * scale)),
                                      Image.Resampling.BILINEAR)
    out = Image.new("RGB", TILE, (18, 18, 22))
    out.paste(img, ((TILE[0] - img.width) // 2, 0))
    draw = ImageDraw.Draw(out)
    if rm.carina_index is not None:
        y = round((heights.max() - heights[rm.carina_index]) * scale)
        for x in range((TILE[0] - img.width) // 2, (TILE[0] + img.width) // 2, 10):
            draw.line((x, y, x + 5, y), fill=(255, 255, 255))
    font = ImageFont.load_default(size=14)
    draw.text((4, TILE[1] - 42), folder.name[:38], fill=(235, 235, 235), font=font)
    rule = ("carina found" if rm.rule == "carina" else "carina not found: thirds")
    draw.text((4, TILE[1] - 22), f"{vol.hu.shape[0]} slices; {rule}", fill=(170, 170, 180),
              font=font)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "report-regions.png"))
    args = parser.parse_args()
    folders = sorted(p for p in (SHARED / "ct" / "real-chest").iterdir() if p.is_dir())
    tiles = [tile(f) for f in folders]
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * TILE[0], rows * TILE[1]), (18, 18, 22))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * TILE[0], (i // cols) * TILE[1]))
        print(f"{folders[i].name}: done", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
