"""``training prepare-ricord``: RICORD DICOM series + MD.ai annotation JSON → NIfTI image/mask pairs.

This module owns turning the RSNA International COVID-19 Open Radiology Database (RICORD) into the
``nifti`` layout (``images/ID.nii.gz``, ``infiltrate/ID.nii.gz``; ID = SeriesInstanceUID). The MD.ai
export lists annotations with ``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID``,
``labelId`` and ``data`` (``vertices`` = one polygon, or ``foreground`` = several polygons, pixel
coordinates ``[column, row]``). Each polygon is filled (even-odd rule, pixel centres) on the slice
whose SOP Instance UID it names; series are read and validated with the node's own reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["fill_polygon", "prepare_ricord", "read_mdai_annotations"]


def fill_polygon(vertices: Sequence[Sequence[float]], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Rasterise one polygon (``[[x, y], ...]``, x = column, y = row) by the even-odd rule.

    A pixel is inside when its centre is; works for concave and self-touching outlines.
    """
    out = np.zeros(shape, bool)
    v = np.asarray(vertices, np.float64)
    if v.ndim != 2 or len(v) < 3:
        return out
    x0, y0 = max(0, int(np.floor(v[:, 0].min()))), max(0, int(np.floor(v[:, 1].min())))
    x1, y1 = min(shape[1] - 1, int(np.ceil(v[:, 0].max()))), min(shape[0] - 1, int(np.ceil(v[:, 1].max())))
    if x1 < x0 or y1 < y0:
        return out
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    inside = np.zeros(yy.shape, bool)
    xs, ys = v[:, 0], v[:, 1]
    xs2, ys2 = np.roll(xs, -1), np.roll(ys, -1)
    for xa, ya, xb, yb in zip(xs, ys, xs2, ys2, strict=False):
        if ya == yb:
            continue
        crosses = (ya > yy) != (yb > yy)
        x_at = xa + (yy - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (xx < x_at)
    out[y0 : y1 + 1, x0 : x1 + 1] = inside
    return out


def read_mdai_annotations(path: Path, labels: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Annotations of an MD.ai JSON export, optionally only those whose label name is listed."""
    doc = json.loads(Path(path).read_text())
    names = {lab["id"]: lab.get("name", lab["id"]) for g in doc.get("labelGroups", [])
             for lab in g.get("labels", [])}
    keep = set(labels) if labels else None
    out = []
    for ds in doc.get("datasets", []):
        for a in ds.get("annotations", []):
            if not a.get("SOPInstanceUID") or not a.get("data"):
                continue
            name = names.get(a.get("labelId", ""), a.get("labelId", ""))
            if keep is None or name in keep:
                out.append({**a, "labelName": name})
    return out


def _polygons(data: dict[str, Any]) -> list[list[list[float]]]:
    if data.get("vertices"):
        return [data["vertices"]]
    return [p for p in data.get("foreground", []) if p]


def prepare_ricord(dicom_dir: Path, annotations: Path, out_dir: Path,
                   labels: Iterable[str] | None = None) -> int:
    """Write one image/mask pair per annotated series.

    Parameters
    ----------
    dicom_dir:
        Folder (searched recursively) with the RICORD DICOM files.
    annotations:
        MD.ai JSON export.
    out_dir:
        Output root (``nifti`` layout).
    labels:
        MD.ai label names counted as infiltrate (default: every label).

    Returns
    -------
    int
        Number of series written.
    """
    import pydicom

    from lungnode.inference.dicom_io import read_series
    from lungnode.inference.geometry import GeometryPolicy
    from lungnode.training.datasets import write_nifti

    anns = read_mdai_annotations(annotations, labels)
    wanted = {a["SeriesInstanceUID"] for a in anns}
    files: dict[str, list[Path]] = {}
    for f in sorted(p for p in Path(dicom_dir).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # not DICOM
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid in wanted:
            files.setdefault(uid, []).append(f)
    written = 0
    for uid, fl in sorted(files.items()):
        vol = read_series(fl, policy=GeometryPolicy(min_slices=1))
        index = {sop: k for k, sop in enumerate(vol.sop_instance_uids)}
        mask = np.zeros(vol.hu.shape, bool)
        for a in anns:
            k = index.get(a["SOPInstanceUID"])
            if a["SeriesInstanceUID"] != uid or k is None:
                continue
            for poly in _polygons(a["data"]):
                mask[k] |= fill_polygon(poly, vol.hu.shape[1:])
        hu = np.clip(np.round(vol.hu), -1024, 3071).astype(np.int16)
        write_nifti(Path(out_dir) / "images" / f"{uid}.nii.gz", hu, vol.spacing_mm)
        write_nifti(Path(out_dir) / "infiltrate" / f"{uid}.nii.gz", mask.astype(np.uint8), vol.spacing_mm)
        written += 1
    return written
