"""Dataset loaders for the public COVID-19 CT segmentation sets and a hospital's own DICOM SEGs.

This module owns reading image/mask pairs from disk into :class:`~lungnode.training.cases.Case`,
one function per layout (``kind``):

``covid19-ct-seg``  Ma et al. (Zenodo 3757476): ``COVID-19-CT-Seg_20cases/NAME.nii.gz`` with
                    ``Infection_Mask/NAME.nii.gz`` and ``Lung_Mask/NAME.nii.gz`` (1 left, 2 right).
                    Dataset name ``coronacases`` or ``radiopaedia`` from the file name; Radiopaedia
                    volumes stored as 0-255 are mapped back to HU (window [-1250, 250]).
``mosmed``          ``studies/CT-N/study_NNNN.nii.gz`` with ``masks/study_NNNN_mask.nii.gz``
                    (studies without a mask are skipped; no lung mask).
``nifti``           ``images/ID.nii.gz`` + ``infiltrate/ID.nii.gz`` [+ ``lungs/ID.nii.gz``]: the
                    output of ``training prepare-ricord`` and ``training phantoms``.
``dicom-seg``       folders of DICOM CT series plus DICOM SEG objects referencing them (3D Slicer,
                    OHIF); segments are matched by SOP Instance UID and mapped by their labels.

Also: :func:`write_case_nifti` (write a case in a layout) and :func:`split_cases` (recipe data →
cached, split train/validation cases; the split is written to ``split_file`` once and reused).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from lungnode.training.cases import Case, cached, load_case, resample_case, save_case
from lungnode.training.recipe import Recipe

__all__ = [
    "DATASET_KINDS",
    "load_covid19_ct_seg",
    "load_dataset",
    "load_dicom_seg",
    "load_mosmed",
    "load_nifti_layout",
    "read_nifti",
    "split_cases",
    "write_case_nifti",
    "write_nifti",
]

#: Segment labels (case-insensitive regular expressions) read as infiltrate / lung in DICOM SEG.
INFILTRATE_LABELS = r"infiltrat|ground.?glass|ggo|consolidat|lesion|covid|opacit|infection"
LUNG_LABELS = r"lung"


def read_nifti(path: Path) -> tuple[npt.NDArray[np.float32], tuple[float, float, float]]:
    """Array ``(slices, rows, columns)`` and spacing ``(slice, row, column)`` mm of a NIfTI file."""
    import SimpleITK as sitk  # noqa: N813

    img = sitk.ReadImage(str(path))
    sx, sy, sz = img.GetSpacing()
    return sitk.GetArrayFromImage(img).astype(np.float32), (float(sz), float(sy), float(sx))


def write_nifti(path: Path, arr: npt.NDArray[Any], spacing_mm: Sequence[float]) -> None:
    """Write ``(slices, rows, columns)`` with spacing ``(slice, row, column)`` as NIfTI."""
    import SimpleITK as sitk  # noqa: N813

    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((float(spacing_mm[2]), float(spacing_mm[1]), float(spacing_mm[0])))
    sitk.WriteImage(img, str(path), useCompression=True)


def _hu(arr: npt.NDArray[np.float32], name: str) -> npt.NDArray[np.int16]:
    if arr.min() >= 0 and arr.max() <= 255 and "radiopaedia" in name:
        arr = arr / 255.0 * 1500.0 - 1250.0  # Ma et al.: Radiopaedia cases windowed [-1250, 250]
    return np.clip(np.round(arr), -1024, 3071).astype(np.int16)


def _stem(p: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", p.name)


def load_covid19_ct_seg(root: Path) -> list[Case]:
    """COVID-19-CT-Seg (Ma et al.) cases with lung and infection masks."""
    img_dir = root / "COVID-19-CT-Seg_20cases"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{root}: no COVID-19-CT-Seg_20cases/ folder")
    cases = []
    for f in sorted(img_dir.glob("*.nii*")):
        inf_f = root / "Infection_Mask" / f.name
        if not inf_f.is_file():
            continue
        img, sp = read_nifti(f)
        inf, _ = read_nifti(inf_f)
        lung_f = root / "Lung_Mask" / f.name
        lung = read_nifti(lung_f)[0] > 0 if lung_f.is_file() else None
        name = _stem(f)
        ds = ("radiopaedia" if "radiopaedia" in name
              else "coronacases" if "corona" in name else "covid19-ct-seg")
        cases.append(Case(name, _hu(img, name), inf > 0, lung, sp, ds))
    return cases


def load_mosmed(root: Path) -> list[Case]:
    """MosMedData studies that have a mask (``masks/study_NNNN_mask.nii.gz``)."""
    cases = []
    for m in sorted((root / "masks").glob("study_*_mask.nii*")):
        sid = m.name.split("_mask")[0]
        found = sorted((root / "studies").glob(f"CT-*/{sid}.nii*"))
        if not found:
            continue
        img, sp = read_nifti(found[0])
        mask, _ = read_nifti(m)
        cases.append(Case(sid, _hu(img, sid), mask > 0, None, sp, "mosmed"))
    return cases


def load_nifti_layout(root: Path, dataset: str = "") -> list[Case]:
    """``images/`` + ``infiltrate/`` [+ ``lungs/``] NIfTI pairs with the same file names."""
    cases = []
    for f in sorted((root / "images").glob("*.nii*")):
        inf_f = root / "infiltrate" / f.name
        if not inf_f.is_file():
            continue
        img, sp = read_nifti(f)
        lung_f = root / "lungs" / f.name
        lung = read_nifti(lung_f)[0] > 0 if lung_f.is_file() else None
        cases.append(Case(_stem(f), _hu(img, f.name), read_nifti(inf_f)[0] > 0, lung, sp,
                          dataset or root.name))
    return cases


def load_dicom_seg(root: Path, infiltrate_labels: str = INFILTRATE_LABELS,
                   lung_labels: str = LUNG_LABELS) -> list[Case]:
    """CT series plus DICOM SEG objects below ``root`` (matched by SOP Instance UID).

    Segments whose label matches ``infiltrate_labels`` are united into the infiltrate mask,
    those matching ``lung_labels`` into the lung mask (case-insensitive regular expressions).
    """
    import highdicom as hd
    import pydicom

    from lungnode.inference.dicom_io import read_series
    from lungnode.inference.geometry import GeometryPolicy

    segs: list[Path] = []
    series: dict[str, list[Path]] = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM: skipped (README files, etc.)
            continue
        if str(ds.get("Modality", "")) == "SEG":
            segs.append(f)
        elif str(ds.get("Modality", "")) == "CT":
            series.setdefault(str(ds.SeriesInstanceUID), []).append(f)
    cases = []
    for sf in segs:
        seg = hd.seg.segread(sf)
        ref_series = {u[1] for u in seg.get_source_image_uids()}
        match = [s for s in ref_series if s in series]
        if not match:
            continue
        vol = read_series(series[match[0]], policy=GeometryPolicy(min_slices=1), require_uids=False)
        uids = list(vol.sop_instance_uids)
        masks: dict[str, npt.NDArray[np.bool_]] = {}
        for item in seg.SegmentSequence:
            label = str(item.SegmentLabel)
            kind = ("infiltrate" if re.search(infiltrate_labels, label, re.I)
                    else "lung" if re.search(lung_labels, label, re.I) else None)
            if kind is None:
                continue
            px = seg.get_pixels_by_source_instance(uids, segment_numbers=[int(item.SegmentNumber)],
                                                   ignore_spatial_locations=True,
                                                   assert_missing_frames_are_empty=True)
            m = np.asarray(px[..., 0] > 0)
            masks[kind] = masks[kind] | m if kind in masks else m
        if "infiltrate" not in masks:
            continue
        hu = np.clip(np.round(vol.hu), -1024, 3071).astype(np.int16)
        cases.append(Case(str(seg.SOPInstanceUID), hu, masks["infiltrate"], masks.get("lung"),
                          vol.spacing_mm, "dicom-seg"))
    return cases


DATASET_KINDS: dict[str, Callable[[Path], list[Case]]] = {
    "covid19-ct-seg": load_covid19_ct_seg,
    "mosmed": load_mosmed,
    "nifti": load_nifti_layout,
    "ricord-prepared": lambda root: load_nifti_layout(root, "ricord"),
    "dicom-seg": load_dicom_seg,
}


def load_dataset(kind: str, root: Path) -> list[Case]:
    """Load every case of a dataset layout (see module docstring)."""
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {sorted(DATASET_KINDS)}")
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    return DATASET_KINDS[kind](root)


def write_case_nifti(case: Case, root: Path, layout: str = "covid19-ct-seg") -> None:
    """Write a case in a dataset layout (``covid19-ct-seg``, ``mosmed`` or ``nifti``)."""
    sp = case.spacing_mm
    if layout == "covid19-ct-seg":
        name = f"{case.case_id}.nii.gz"
        write_nifti(root / "COVID-19-CT-Seg_20cases" / name, case.hu, sp)
        write_nifti(root / "Infection_Mask" / name, case.infiltrate.astype(np.uint8), sp)
        if case.lung is not None:
            write_nifti(root / "Lung_Mask" / name, case.lung.astype(np.uint8), sp)
    elif layout == "mosmed":
        digits = re.sub(r"\D", "", case.case_id)[-4:].rjust(4, "0")
        write_nifti(root / "studies" / "CT-1" / f"study_{digits}.nii.gz", case.hu, sp)
        write_nifti(root / "masks" / f"study_{digits}_mask.nii.gz", case.infiltrate.astype(np.uint8), sp)
    elif layout == "nifti":
        name = f"{case.case_id}.nii.gz"
        write_nifti(root / "images" / name, case.hu, sp)
        write_nifti(root / "infiltrate" / name, case.infiltrate.astype(np.uint8), sp)
        if case.lung is not None:
            write_nifti(root / "lungs" / name, case.lung.astype(np.uint8), sp)
    else:
        raise ValueError(f"unknown layout {layout!r}")


def split_cases(recipe: Recipe, log: Callable[[str], None] = print) -> tuple[list[Case], list[Case]]:
    """Load the recipe's datasets, resample (cached) to its spacing, split train/validation.

    The split is read from ``data.split_file`` when it exists, otherwise drawn (seeded) with
    ``val_fraction`` and written there, so every later run and ``evaluate`` use the same split.
    """
    d = recipe.data
    cache = Path(d.cache_dir) if d.cache_dir else None
    cases: list[Case] = []
    for spec in d.datasets:
        kind, root = str(spec["kind"]), Path(str(spec["root"]))
        key = f"{kind}|{root.resolve()}|{d.spacing_mm}"
        index = cached(cache, key + "|index")
        if index is not None and index.with_suffix(".json").is_file():
            files = json.loads(index.with_suffix(".json").read_text())
            loaded = [load_case(Path(f)) for f in files]
        else:
            loaded = [resample_case(c, d.spacing_mm) for c in load_dataset(kind, root)]
            if index is not None:
                files = []
                for c in loaded:
                    f = cached(cache, f"{key}|{c.case_id}")
                    assert f is not None
                    save_case(c, f)
                    files.append(str(f))
                index.with_suffix(".json").write_text(json.dumps(files))
        log(f"{kind} {root}: {len(loaded)} cases")
        cases += loaded
    ids = [f"{c.dataset}/{c.case_id}" for c in cases]
    split_path = Path(d.split_file) if d.split_file else None
    if split_path is not None and split_path.is_file():
        split = json.loads(split_path.read_text())
    else:
        order = np.random.default_rng(recipe.train.seed).permutation(len(ids))
        n_val = max(1, round(len(ids) * d.val_fraction)) if len(ids) > 1 else 0
        split = {"train": sorted(ids[i] for i in order[n_val:]), "val": sorted(ids[i] for i in order[:n_val])}
        if split_path is not None:
            split_path.parent.mkdir(parents=True, exist_ok=True)
            split_path.write_text(json.dumps(split, indent=1))
    train_ids, val_ids = set(split["train"]), set(split["val"])
    train = [c for c, i in zip(cases, ids, strict=False) if i in train_ids]
    val = [c for c, i in zip(cases, ids, strict=False) if i in val_ids]
    return train, val
