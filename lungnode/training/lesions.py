"""Real COVID-19 lesion shapes: the lesion bank built from MosMed infection masks.

This module owns turning the 50 real MosMedData masks (``study_NNNN_mask.nii.gz``, labels 0/1,
8 mm slices) into a :class:`LesionBank`: every 3D connected component (26-connectivity) of at least
``min_voxels`` voxels, cropped, with its voxel spacing in mm and the study it came from. The bank
is saved as one ``.npz`` (no SimpleITK needed to read it back), so phantoms can be generated on a
machine that has only numpy/scipy. Splitting by *study* keeps held-out phantoms free of lesion
shapes seen in training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = ["Lesion", "LesionBank", "build_lesion_bank", "read_nifti_mask"]

_STUDY_RE = re.compile(r"study_(\d+)_mask\.nii(\.gz)?$")


@dataclass(frozen=True)
class Lesion:
    """One connected lesion component.

    Attributes
    ----------
    mask:
        ``bool`` array ``(D, H, W)`` cropped to the component's bounding box.
    spacing_mm:
        ``(slice, row, column)`` voxel spacing of ``mask``.
    study:
        Study identifier (``"0255"``) the component came from.
    """

    mask: npt.NDArray[np.bool_]
    spacing_mm: tuple[float, float, float]
    study: str

    @property
    def volume_ml(self) -> float:
        """Volume in millilitres."""
        return float(self.mask.sum()) * float(np.prod(self.spacing_mm)) / 1000.0


class LesionBank:
    """A collection of real lesion shapes, split by study.

    Parameters
    ----------
    lesions:
        The components.
    """

    def __init__(self, lesions: Sequence[Lesion]) -> None:
        if not lesions:
            raise ValueError("a lesion bank needs at least one lesion")
        self.lesions = list(lesions)

    def __len__(self) -> int:
        return len(self.lesions)

    @property
    def studies(self) -> list[str]:
        """Sorted distinct study identifiers."""
        return sorted({les.study for les in self.lesions})

    def subset(self, studies: Iterable[str]) -> LesionBank:
        """Bank restricted to some studies."""
        keep = set(studies)
        return LesionBank([les for les in self.lesions if les.study in keep])

    def split(self, held_out_fraction: float = 0.2) -> tuple[LesionBank, LesionBank]:
        """Deterministic split by study: the last ``held_out_fraction`` of studies are held out.

        Returns
        -------
        (LesionBank, LesionBank)
            Training bank, held-out bank (disjoint studies).
        """
        studies = self.studies
        n_out = max(1, round(len(studies) * held_out_fraction))
        if n_out >= len(studies):
            raise ValueError("need at least two studies to split")
        return self.subset(studies[:-n_out]), self.subset(studies[-n_out:])

    def save(self, path: Path | str) -> None:
        """Write the bank as one compressed ``.npz``."""
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "spacings": np.asarray([les.spacing_mm for les in self.lesions], np.float64),
            "studies": np.asarray([les.study for les in self.lesions]),
        }
        for i, les in enumerate(self.lesions):
            arrays[f"m{i}"] = np.packbits(les.mask.reshape(-1))
            arrays[f"s{i}"] = np.asarray(les.mask.shape, np.int64)
        np.savez_compressed(Path(path), **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path | str) -> LesionBank:
        """Read a bank written by :meth:`save`."""
        with np.load(Path(path)) as z:
            spacings = z["spacings"]
            studies = z["studies"]
            lesions = []
            for i in range(len(studies)):
                shape = tuple(int(v) for v in z[f"s{i}"])
                flat = np.unpackbits(z[f"m{i}"])[: int(np.prod(shape))].astype(bool)
                sp = spacings[i]
                lesions.append(Lesion(flat.reshape(shape), (float(sp[0]), float(sp[1]), float(sp[2])),
                                      str(studies[i])))
        return cls(lesions)


def read_nifti_mask(path: Path | str) -> tuple[npt.NDArray[np.uint8], tuple[float, float, float]]:
    """Read a NIfTI mask with SimpleITK.

    Returns
    -------
    (numpy.ndarray, tuple of float)
        ``uint8`` array ``(slices, rows, columns)`` and spacing ``(slice, row, column)`` in mm.
    """
    import SimpleITK as sitk  # noqa: N813

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.uint8)
    sx, sy, sz = img.GetSpacing()
    return arr, (float(sz), float(sy), float(sx))


def build_lesion_bank(folder: Path | str, min_voxels: int = 20) -> LesionBank:
    """Extract every lesion component of the MosMed masks in a folder.

    Parameters
    ----------
    folder:
        Folder with ``study_NNNN_mask.nii.gz`` files (MosMed ``masks/`` layout).
    min_voxels:
        Smaller components (annotation specks) are skipped.

    Returns
    -------
    LesionBank
    """
    lesions: list[Lesion] = []
    files = sorted(p for p in Path(folder).iterdir() if _STUDY_RE.search(p.name))
    if not files:
        raise FileNotFoundError(f"no study_NNNN_mask.nii.gz files in {folder}")
    structure = np.ones((3, 3, 3), bool)
    for f in files:
        m = _STUDY_RE.search(f.name)
        assert m is not None
        arr, spacing = read_nifti_mask(f)
        labels, _ = ndimage.label(arr > 0, structure=structure)
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            comp = labels[sl] == i
            if comp.sum() >= min_voxels:
                lesions.append(Lesion(np.ascontiguousarray(comp), spacing, m.group(1)))
    return LesionBank(lesions)
