"""Reading a CT series from DICOM files into a validated :class:`SeriesVolume` in HU.

This module owns pixel decoding (any transfer syntax pydicom can decode with its installed
plugins: native little/big endian, deflate, RLE, JPEG lossless through python-gdcm, JPEG-LS
through pyjpegls, JPEG 2000 through pylibjpeg-openjpeg), the rescale to Hounsfield units (per
slice or per frame), single-frame and multi-frame (Enhanced CT) layouts, and finding the DICOM
files of one series in a folder. All geometric decisions are delegated to
:func:`lungnode.inference.geometry.check_slice_geometry`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from lungnode.inference.geometry import GeometryPolicy, GeometryReport, check_slice_geometry
from lungnode.inference.types import SeriesVolume

__all__ = [
    "FrameHeader",
    "SeriesError",
    "find_series_files",
    "frame_headers",
    "read_series",
]

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}


class SeriesError(ValueError):
    """Files that do not form one readable CT series (wrong modality, mixed series, bad UIDs)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FrameHeader:
    """Geometry and rescale of one slice (a single-frame file or one frame of a multi-frame)."""

    path: Path
    frame: int  # 1-based
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    instance_number: int | None
    sop_instance_uid: str


def _seq_item(ds: Dataset, seq: str, attr: str) -> Any:
    if seq in ds and len(ds[seq].value) > 0 and attr in ds[seq].value[0]:
        return ds[seq].value[0][attr].value
    return None


def _functional(ds: Dataset, frame_idx: int, seq: str, attr: str) -> Any:
    """Attribute from per-frame functional groups, then shared groups, then the top level."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame_idx),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds[groups].value if groups in ds else []
        if index < len(items):
            value = _seq_item(items[index], seq, attr)
            if value is not None:
                return value
    return ds.get(attr)


def frame_headers(path: Path, ds: Dataset) -> list[FrameHeader]:
    """Per-slice headers of one dataset (one entry per frame for multi-frame objects).

    Parameters
    ----------
    path:
        File the dataset was read from (kept for provenance).
    ds:
        The dataset (pixel data may be deferred or absent).

    Returns
    -------
    list of FrameHeader
    """
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    multi = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    out: list[FrameHeader] = []
    for f in range(n_frames):
        if multi:
            ipp = _functional(ds, f, "PlanePositionSequence", "ImagePositionPatient")
            iop = _functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = _functional(ds, f, "PixelMeasuresSequence", "PixelSpacing")
            slope = _functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
            icpt = _functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        else:
            ipp, iop, ps = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get(
                "PixelSpacing"
            )
            slope, icpt = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if ipp is None or iop is None or ps is None:
            missing = [n for n, v in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                                      ("PixelSpacing", ps)) if v is None]
            raise SeriesError(f"{path.name}: missing {', '.join(missing)}")
        inst = ds.get("InstanceNumber")
        out.append(
            FrameHeader(
                path=path,
                frame=f + 1,
                position=tuple(float(v) for v in ipp),  # type: ignore[arg-type]
                orientation=tuple(float(v) for v in iop),
                pixel_spacing=(float(ps[0]), float(ps[1])),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=float(slope) if slope is not None else 1.0,
                intercept=float(icpt) if icpt is not None else 0.0,
                instance_number=int(inst) if inst not in (None, "") else None,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
            )
        )
    return out


def _check_ct(path: Path, ds: Dataset, require_uids: bool) -> None:
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "")
    if sop and sop not in CT_SOP_CLASSES:
        name = getattr(ds.SOPClassUID, "name", sop)
        raise SeriesError(f"{path.name}: not a CT image ({name})")
    if not sop and modality != "CT":
        raise SeriesError(f"{path.name}: not a CT image (no SOP Class UID, modality {modality!r})")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise SeriesError(f"{path.name}: no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesError(f"{path.name}: colour images are not CT slices")
    if require_uids:
        missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")
                   if not str(ds.get(k, "") or "").strip()]
        if missing:
            raise SeriesError(f"{path.name}: empty or missing {', '.join(missing)}")


def read_series(
    files: Sequence[Path],
    policy: GeometryPolicy | None = None,
    require_uids: bool = True,
    threads: int | None = None,
) -> SeriesVolume:
    """Read, validate and stack one CT series into HU.

    Parameters
    ----------
    files:
        The series' files (any order; single-frame slices or multi-frame Enhanced CT objects).
    policy:
        Geometry tolerances (:class:`GeometryPolicy`).
    require_uids:
        Refuse files whose SOP/Series/Study Instance UIDs or SOP Class UID are empty.
    threads:
        Decoder threads (default: available cores, at most 4).

    Returns
    -------
    SeriesVolume
        ``float32`` HU volume sorted along the slice normal, with geometry and provenance.

    Raises
    ------
    SeriesError
        Unreadable files, non-CT objects, several series mixed together.
    GeometryError
        The slices do not form a valid volume (see :mod:`lungnode.inference.geometry`).
    """
    if not files:
        raise SeriesError("no files given")
    paths = [Path(f) for f in files]
    datasets: list[Dataset] = []
    for p in paths:
        try:
            ds: Dataset = pydicom.dcmread(p, defer_size="1 KB")
        except Exception as exc:  # pydicom raises many types for broken files
            raise SeriesError(f"{p.name}: not a readable DICOM file ({type(exc).__name__})") from exc
        _check_ct(p, ds, require_uids)
        datasets.append(ds)
    series_uids = {str(ds.get("SeriesInstanceUID", "") or "") for ds in datasets}
    if len(series_uids) > 1:
        raise SeriesError(f"files belong to {len(series_uids)} different series")

    headers: list[FrameHeader] = []
    frames_of_reference: list[str | None] = []
    for p, ds in zip(paths, datasets, strict=True):
        frames = frame_headers(p, ds)
        headers.extend(frames)
        frames_of_reference += [str(ds.get("FrameOfReferenceUID", "") or "")] * len(frames)
    report = check_slice_geometry(
        [h.position for h in headers],
        [h.orientation for h in headers],
        [(h.rows, h.columns) for h in headers],
        pixel_spacings=[h.pixel_spacing for h in headers],
        instance_numbers=[h.instance_number for h in headers],
        policy=policy,
        frames_of_reference=frames_of_reference,
    )
    hu = _decode_all(paths, datasets, headers, report, threads)
    sorted_h = [headers[i] for i in report.order]
    z = np.asarray(report.positions_along_normal_mm) - report.positions_along_normal_mm[0]
    return SeriesVolume(
        hu=hu,
        spacing_mm=(report.slice_spacing_mm, *report.pixel_spacing_mm),
        origin_mm=report.origin_mm,
        direction=report.direction,
        source_files=tuple(h.path for h in sorted_h),
        source_frames=tuple(h.frame for h in sorted_h),
        sop_instance_uids=tuple(h.sop_instance_uid for h in sorted_h),
        slice_positions_mm=() if report.regular else tuple(float(v) for v in z),
    )


def _decode_all(
    paths: list[Path],
    datasets: list[Dataset],
    headers: list[FrameHeader],
    report: GeometryReport,
    threads: int | None,
) -> np.ndarray:
    """Decode every file into one preallocated float32 HU array in sorted order."""
    out = np.empty((report.num_slices, report.rows, report.columns), dtype=np.float32)
    dest = {idx: k for k, idx in enumerate(report.order)}
    # header index of each (file, frame)
    first_index: list[int] = []
    i = 0
    for ds in datasets:
        first_index.append(i)
        i += int(ds.get("NumberOfFrames", 1) or 1)

    def work(j: int) -> None:
        ds = datasets[j]
        try:
            arr = ds.pixel_array
        except Exception as exc:
            raise SeriesError(f"{paths[j].name}: pixel data cannot be decoded "
                              f"({type(exc).__name__})") from exc
        nf = int(ds.get("NumberOfFrames", 1) or 1)
        if nf == 1 and arr.ndim == 2:
            arr = arr[None]
        if arr.shape != (nf, report.rows, report.columns):
            raise SeriesError(f"{paths[j].name}: pixel data shape {arr.shape} does not match header")
        for f in range(nf):
            h = headers[first_index[j] + f]
            k = dest[first_index[j] + f]
            np.multiply(arr[f], np.float32(h.slope), out=out[k], casting="unsafe")
            out[k] += np.float32(h.intercept)
        if "PixelData" in ds:  # free the encoded bytes early
            del ds.PixelData

    n_threads = threads or min(4, len(os.sched_getaffinity(0)))
    if n_threads > 1 and len(datasets) > 1:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(work, range(len(datasets))))
    else:
        for j in range(len(datasets)):
            work(j)
    return out


def find_series_files(folder: Path, series_uid: str | None = None) -> list[Path]:
    """Find the DICOM files of one series under ``folder`` (recursively).

    Parameters
    ----------
    folder:
        Directory to scan; non-DICOM files are ignored.
    series_uid:
        Series Instance UID to pick when the folder holds several series.

    Returns
    -------
    list of Path
        Files of the chosen series, in file-name order.

    Raises
    ------
    SeriesError
        No DICOM image found, several series and none picked, or the picked one is absent.
    """
    by_series: dict[str, list[Path]] = {}
    descr: dict[str, str] = {}
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file()):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "Modality", "SeriesDescription",
                                                "SOPClassUID"])
        except Exception:
            continue
        if "SOPClassUID" not in ds and "Modality" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        by_series.setdefault(uid, []).append(p)
        descr[uid] = f"{ds.get('Modality', '?')} {ds.get('SeriesDescription', '')}".strip()
    if not by_series:
        raise SeriesError(f"no DICOM files found in {folder}")
    if series_uid is not None:
        if series_uid not in by_series:
            raise SeriesError(f"series {series_uid} not found in {folder}")
        return by_series[series_uid]
    if len(by_series) > 1:
        listing = "; ".join(f"{u or '<empty UID>'} ({descr[u]}, {len(v)} files)"
                            for u, v in by_series.items())
        raise SeriesError(f"{folder} holds {len(by_series)} series, pick one: {listing}")
    return next(iter(by_series.values()))
