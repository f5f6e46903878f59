"""Training cases: the in-memory form, the preprocessing cache, and phantom case sets.

This module owns :class:`Case` (HU + lung + infiltrate masks at a spacing), resampling a case to
the recipe's spacing, the ``.npz`` preprocessing cache (one file per case, keyed by the source's
identity and the spacing), and building train/validation phantom sets whose lesion shapes come
from disjoint MosMed studies (:func:`phantom_cases`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lungnode.training.lesions import LesionBank, build_lesion_bank
from lungnode.training.phantom import PhantomOptions, make_phantom

__all__ = [
    "Case",
    "cached",
    "default_lesion_bank",
    "load_case",
    "phantom_cases",
    "resample_case",
    "save_case",
]


@dataclass
class Case:
    """One training/evaluation volume.

    Attributes
    ----------
    case_id:
        Identifier (unique within a dataset).
    hu:
        ``int16`` HU ``(D, H, W)``.
    infiltrate:
        ``bool`` infiltrate mask.
    lung:
        ``bool`` lung mask, or ``None`` when the dataset has none.
    spacing_mm:
        ``(slice, row, column)`` spacing.
    dataset:
        Dataset name (evaluation tables group by it).
    """

    case_id: str
    hu: npt.NDArray[np.int16]
    infiltrate: npt.NDArray[np.bool_]
    lung: npt.NDArray[np.bool_] | None
    spacing_mm: tuple[float, float, float]
    dataset: str = ""


def resample_case(case: Case, spacing_mm: Sequence[float]) -> Case:
    """Resample HU (linear) and masks (linear, thresholded at 0.5) to a spacing."""
    if np.allclose(case.spacing_mm, spacing_mm, rtol=1e-3):
        return case
    zoom = [s / t for s, t in zip(case.spacing_mm, spacing_mm, strict=False)]
    hu = ndimage.zoom(case.hu.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")

    def m(a: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        r = ndimage.zoom(a.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")
        return np.asarray(r > 0.5)

    sp = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    return Case(case.case_id, np.round(hu).astype(np.int16), m(case.infiltrate),
                None if case.lung is None else m(case.lung), sp, case.dataset)


def save_case(case: Case, path: Path) -> None:
    """Write a case to a compressed ``.npz`` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "hu": case.hu, "infiltrate": case.infiltrate,
        "spacing": np.asarray(case.spacing_mm, np.float64),
        "meta": np.asarray(json.dumps({"case_id": case.case_id, "dataset": case.dataset})),
    }
    if case.lung is not None:
        arrays["lung"] = case.lung
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def load_case(path: Path) -> Case:
    """Read a case written by :func:`save_case`."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        sp = z["spacing"]
        return Case(meta["case_id"], z["hu"].astype(np.int16), z["infiltrate"].astype(bool),
                    z["lung"].astype(bool) if "lung" in z else None,
                    (float(sp[0]), float(sp[1]), float(sp[2])), meta["dataset"])


def cached(cache_dir: Path | None, key: str) -> Path | None:
    """Cache file for a key (``None`` when caching is off)."""
    if cache_dir is None:
        return None
    return cache_dir / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".npz")


def default_lesion_bank(spec: str = "") -> LesionBank:
    """The lesion bank named by a recipe (``.npz`` or MosMed masks folder) or found by default.

    Order: ``spec``; ``$LUNGNODE_LESIONS``; ``.devcarry/mosmed_lesions.npz`` and
    ``../shared/data/masks/mosmed`` relative to the repository.
    """
    repo = Path(__file__).resolve().parents[2]
    candidates = [spec, os.environ.get("LUNGNODE_LESIONS", ""),
                  str(repo / ".devcarry" / "mosmed_lesions.npz"),
                  str(repo.parent / "shared" / "data" / "masks" / "mosmed")]
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        if p.is_file() and p.suffix == ".npz":
            return LesionBank.load(p)
        if p.is_dir():
            return build_lesion_bank(p)
    raise FileNotFoundError("no lesion bank: set [data] lesion_bank, $LUNGNODE_LESIONS, or provide "
                            "../shared/data/masks/mosmed")


def _one_phantom(args: tuple[int, LesionBank, PhantomOptions, str, str]) -> Case:
    seed, bank, opts, prefix, dataset = args
    p = make_phantom(np.random.default_rng(seed), bank, opts)
    return Case(f"{prefix}{seed:05d}", p.hu, p.infiltrate, p.lung, p.spacing_mm, dataset)


def phantom_cases(
    n: int,
    bank: LesionBank,
    options: PhantomOptions,
    seed0: int,
    prefix: str = "phantom",
    dataset: str = "phantom",
    workers: int = 0,
    cache_dir: Path | None = None,
) -> list[Case]:
    """Generate (or read from cache) ``n`` phantoms with seeds ``seed0 .. seed0 + n - 1``.

    Parameters
    ----------
    n:
        Number of phantoms.
    bank:
        Lesion shapes to use (pass the held-out part of a split for validation sets).
    options:
        Phantom settings.
    seed0:
        First seed.
    prefix, dataset:
        Case id prefix and dataset name.
    workers:
        Processes (0 = ``os.cpu_count()``, 1 = in this process).
    cache_dir:
        When set, phantoms are cached as ``.npz`` keyed by seed, options and bank studies.
    """
    studies = ",".join(bank.studies)
    keys = [f"phantom|{seed0 + i}|{options}|{studies}|{len(bank)}" for i in range(n)]
    out: list[Case | None] = [None] * n
    todo = []
    for i, k in enumerate(keys):
        f = cached(cache_dir, k)
        if f is not None and f.is_file():
            out[i] = load_case(f)
        else:
            todo.append(i)
    jobs = [(seed0 + i, bank, options, prefix, dataset) for i in todo]
    nw = workers or (os.cpu_count() or 1)
    if nw > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(nw, len(jobs))) as ex:
            made = list(ex.map(_one_phantom, jobs, chunksize=1))
    else:
        made = [_one_phantom(j) for j in jobs]
    for i, c in zip(todo, made, strict=False):
        out[i] = c
        f = cached(cache_dir, keys[i])
        if f is not None:
            save_case(c, f)
    return [c for c in out if c is not None]
