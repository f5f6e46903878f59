"""Real-anatomy training cases: real chest CT hosts, their lung masks, painted lesions, patient split.

This module owns the host list (``../shared/data/ct/real-chest/`` and the 30-slice chest CT), the
split **by patient** (never by case), reading a host through the node's own series reader and
resampling (:mod:`lungnode.inference.predict`, the same path as inference), its lung target (the
threshold lung mask with the anatomy rules, :func:`lungnode.inference.lungmask.threshold_lungs`),
and building cases: each training host once unmodified (a negative: empty infiltrate target) and
``painted_per_host`` times with real MosMed lesion shapes painted in (:mod:`.painting`). Hosts are
cropped in-plane to the body and along z to the lungs +- ``z_margin_mm`` (the whole-body scan keeps
its upper abdomen, whose bowel and stomach gas are negatives for the lung class).

Split (``HOSTS``): training patients LIDC-IDRI-0002, Lung_Dx-A0001 (both reconstructions),
POPI and TCGA-DE-A4MA; held out for evaluation: LIDC-IDRI-0001, CMB-CRC-MSB-01068 and
Lung_Dx-A0002 (the 30-slice B40f series and its B70f reconstruction: one patient, both held out).
Lesion shapes: MosMed studies of the bank's training part for training cases, the held-out
studies (:meth:`.LesionBank.split`) for validation and evaluation cases.

Cases are cached as compressed ``.npz`` (int16 HU, bool masks) in ``cache_dir`` (default
``.cache/cases`` in the repository, git-ignored).
"""

from __future__ import annotations

import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from lungnode.training.cases import Case, cached, load_case, save_case
from lungnode.training.lesions import LesionBank
from lungnode.training.painting import PaintOptions, paint_lesions

__all__ = ["HOSTS", "Host", "HostVolume", "cached_host", "default_real_root", "held_out_cases",
           "host_cache_path", "host_cases", "load_host", "load_host_file", "real_cases", "save_host"]


@dataclass(frozen=True)
class Host:
    """One real CT series used as a host."""

    folder: str
    patient: str
    split: str  # "train" or "eval"


HOSTS: tuple[Host, ...] = (
    Host("real-chest/lidc-idri-0002", "LIDC-IDRI-0002", "train"),
    Host("real-chest/lung-dx-a0001-5mm-recon-a", "Lung_Dx-A0001", "train"),
    Host("real-chest/lung-dx-a0001-5mm-recon-b", "Lung_Dx-A0001", "train"),
    Host("real-chest/popi-4dct-phase00", "POPI-phase00", "train"),
    Host("real-chest/tcga-thca-de-a4ma-wholebody", "TCGA-DE-A4MA", "train"),
    Host("real-chest/lidc-idri-0001", "LIDC-IDRI-0001", "eval"),
    Host("real-chest/cmb-crc-msb-01068-partial", "CMB-CRC-MSB-01068", "eval"),
    Host("real-chest/lung-dx-a0002-8mm-b70f", "Lung_Dx-A0002", "eval"),
    Host("chest-30-slices-uncompressed", "Lung_Dx-A0002", "eval"),
)


def default_real_root() -> Path:
    """``../shared/data/ct`` beside the repository."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "ct"


@dataclass
class HostVolume:
    """A host on the model grid, cropped: HU, lung labels and orientation."""

    name: str
    hu: npt.NDArray[np.int16]
    lung_labels: npt.NDArray[np.uint8]
    spacing_mm: tuple[float, float, float]
    superior: float
    posterior: float


def _nearest_labels(labels: npt.NDArray[np.uint8], src_z: npt.NDArray[np.float64],
                    dst_z: npt.NDArray[np.float64], shape: tuple[int, int, int]
                    ) -> npt.NDArray[np.uint8]:
    zi = np.abs(src_z[None, :] - dst_z[:, None]).argmin(axis=1)
    ri = np.rint(np.arange(shape[1]) * (labels.shape[1] - 1) / max(shape[1] - 1, 1)).astype(np.intp)
    ci = np.rint(np.arange(shape[2]) * (labels.shape[2] - 1) / max(shape[2] - 1, 1)).astype(np.intp)
    return labels[zi][:, ri][:, :, ci]


def load_host(folder: Path, spacing_mm: tuple[float, float, float],
              z_margin_mm: float = 60.0) -> HostVolume:
    """Read a host series and bring it to the model grid with its lung labels.

    Parameters
    ----------
    folder:
        DICOM series folder.
    spacing_mm:
        Model grid spacing.
    z_margin_mm:
        Slices kept beyond the lungs at both ends.

    Returns
    -------
    HostVolume
    """
    from lungnode.inference.dicom_io import find_series_files, read_series
    from lungnode.inference.geometry import GeometryPolicy
    from lungnode.inference.lungmask import body_mask, superior_sign, threshold_lungs
    from lungnode.inference.predict import model_grid, resample_to_model_grid

    vol = read_series(find_series_files(folder), GeometryPolicy(allow_irregular_spacing=True), False)
    labels = threshold_lungs(vol).labels
    src_z = vol.slice_positions()
    grid = model_grid(vol.hu.shape, src_z, (vol.spacing_mm[1], vol.spacing_mm[2]), spacing_mm)
    hu = resample_to_model_grid(vol.hu, grid).numpy()
    lab = _nearest_labels(labels, src_z, grid.z_positions_mm, grid.shape)
    body = body_mask(hu)
    zs = np.nonzero(lab.any(axis=(1, 2)))[0]
    mz = round(z_margin_mm / spacing_mm[0])
    z0, z1 = (max(0, zs.min() - mz), min(hu.shape[0], zs.max() + mz + 1)) if zs.size else (0, hu.shape[0])
    rows = np.nonzero(body.any(axis=(0, 2)))[0]
    cols = np.nonzero(body.any(axis=(0, 1)))[0]
    r0, r1 = max(0, rows.min() - 4), min(hu.shape[1], rows.max() + 5)
    c0, c1 = max(0, cols.min() - 4), min(hu.shape[2], cols.max() + 5)
    crop = (slice(z0, z1), slice(r0, r1), slice(c0, c1))
    pz = float(grid.z_positions_mm[1] - grid.z_positions_mm[0]) if grid.shape[0] > 1 else spacing_mm[0]
    pr = (vol.hu.shape[1] - 1) * vol.spacing_mm[1] / max(grid.shape[1] - 1, 1)
    pc = (vol.hu.shape[2] - 1) * vol.spacing_mm[2] / max(grid.shape[2] - 1, 1)
    ny = vol.direction[1][1]
    return HostVolume(
        name=folder.name,
        hu=np.clip(np.rint(hu[crop]), -1024, 3071).astype(np.int16),
        lung_labels=np.ascontiguousarray(lab[crop]),
        spacing_mm=(pz, pr, pc),
        superior=superior_sign(vol),
        posterior=float(np.sign(ny)) if abs(ny) >= 0.5 else 0.0,
    )


def save_host(host: HostVolume, path: Path, hu_step: int = 1) -> None:
    """Write a host (LZMA-compressed HU, about 20 % smaller than zlib) atomically.

    Parameters
    ----------
    host:
        Host on the model grid.
    path:
        ``.npz`` file.
    hu_step:
        Round HU to multiples of this (1 = exact). The packed set for a GPU machine uses 4: an
        error of at most 2 HU, far below the CT noise, for a file about 30 % smaller.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    hu = host.hu if hu_step == 1 else (np.rint(host.hu / hu_step) * hu_step).astype(np.int16)
    packed = np.frombuffer(lzma.compress(np.ascontiguousarray(hu, "<i2").tobytes()), np.uint8)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, hu_lzma=packed, shape=np.asarray(hu.shape, np.int64),
                        lung_labels=host.lung_labels, hu_step=np.asarray(hu_step),
                        spacing=np.asarray(host.spacing_mm, np.float64),
                        orientation=np.asarray([host.superior, host.posterior], np.float64),
                        name=np.asarray(host.name))
    tmp.replace(path)


def load_host_file(path: Path) -> HostVolume:
    """Read a host written by :func:`save_host`."""
    with np.load(path) as z:
        shape = tuple(int(v) for v in z["shape"])
        hu = np.frombuffer(lzma.decompress(z["hu_lzma"].tobytes()), "<i2").reshape(shape).astype(np.int16)
        sp, ori = z["spacing"], z["orientation"]
        return HostVolume(str(z["name"]), hu, z["lung_labels"].astype(np.uint8),
                          (float(sp[0]), float(sp[1]), float(sp[2])), float(ori[0]), float(ori[1]))


def host_cache_path(cache_dir: Path | None, host: Host,
                    spacing_mm: tuple[float, float, float]) -> Path | None:
    """Where :func:`cached_host` keeps a host (``None`` when caching is off)."""
    return cached(cache_dir, f"host|{host.folder}|{spacing_mm}|v1")


def cached_host(root: Path, host: Host, spacing_mm: tuple[float, float, float],
                cache_dir: Path | None) -> HostVolume | None:
    """A host on the model grid, from ``cache_dir`` when it holds it, else read and cached.

    The cached host (int16 HU and lung labels, cropped, a few MB) is what travels to a GPU
    machine instead of the DICOM folder: a copy of ``cache_dir`` is enough to paint the cases
    there (see ``python -m lungnode.training pack``).

    Returns
    -------
    HostVolume or None
        ``None`` when neither the cache nor the DICOM folder has it.
    """
    path = host_cache_path(cache_dir, host, spacing_mm)
    if path is not None and path.is_file():
        return load_host_file(path)
    folder = root / host.folder
    if not folder.is_dir():
        return None
    vol = load_host(folder, spacing_mm)
    if path is not None:
        save_host(vol, path)
    return vol


def host_cases(host: HostVolume, n_painted: int, bank: LesionBank, seed: int, dataset: str,
               include_unmodified: bool = True, options: PaintOptions | None = None) -> list[Case]:
    """The unmodified host (negative) and ``n_painted`` painted variants.

    Parameters
    ----------
    host:
        Host on the model grid.
    n_painted:
        Painted variants (seeds ``seed .. seed + n_painted - 1``).
    bank:
        Lesion shapes.
    seed:
        First seed.
    dataset:
        Dataset name of the cases.
    include_unmodified:
        Add the host itself with an empty infiltrate target.
    options:
        Painting options.

    Returns
    -------
    list of Case
    """
    lung = host.lung_labels > 0
    out: list[Case] = []
    if include_unmodified:
        out.append(Case(f"{host.name}-unmodified", host.hu, np.zeros(lung.shape, bool), lung,
                        host.spacing_mm, dataset))
    for i in range(n_painted):
        p = paint_lesions(host.hu, host.lung_labels, host.spacing_mm, bank,
                          np.random.default_rng(seed + i), host.superior, host.posterior, options)
        out.append(Case(f"{host.name}-painted{seed + i}", p.hu, p.infiltrate, lung | p.infiltrate,
                        host.spacing_mm, dataset))
    return out


def _cached_cases(cache_dir: Path | None, key: str, n: int,
                  build: Callable[[], list[Case] | None]) -> list[Case] | None:
    """The ``n`` cases cached under ``key``, or ``build()`` them and cache them (``None``: no host)."""
    index = cached(cache_dir, key)
    files = [index.with_name(f"{index.stem}-{i}.npz") for i in range(n)] if index else []
    if files and all(f.is_file() for f in files):
        return [load_case(f) for f in files]
    cases = build()
    for c, f in zip(cases or [], files, strict=False):
        save_case(c, f)
    return cases


def held_out_cases(root: Path, spacing_mm: tuple[float, float, float], bank: LesionBank,
                   held_out_fraction: float, n_painted: int, cache_dir: Path | None) -> list[Case]:
    """The held-out patients' real-chest hosts on the model grid, unmodified and painted (cached).

    Each evaluation host once unmodified and ``n_painted`` times with lesion shapes of the held-out
    MosMed studies (seeds ``900000 + 1000 * i``). Hosts that are missing are skipped.

    Returns
    -------
    list of Case
    """
    _, held_bank = bank.split(held_out_fraction)
    out: list[Case] = []
    hosts = [x for x in HOSTS if x.split == "eval" and x.folder.startswith("real-chest")]
    for i, h in enumerate(hosts):
        key = f"eval|{h.folder}|{spacing_mm}|{n_painted}|{held_out_fraction}|v2"

        def build(h: Host = h, i: int = i) -> list[Case] | None:
            host = cached_host(root, h, spacing_mm, cache_dir)
            return None if host is None else host_cases(host, n_painted, held_bank, 900_000 + 1000 * i,
                                                         "real-eval")

        out += _cached_cases(cache_dir, key, 1 + n_painted, build) or []
    return out


def real_cases(
    root: Path, spacing_mm: tuple[float, float, float], bank: LesionBank, held_out_fraction: float,
    painted_per_host: int, val_per_host: int, cache_dir: Path | None,
    log: Callable[[str], None] = print,
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases from the training patients (cached).

    Training: every training host unmodified + ``painted_per_host`` painted with training lesion
    shapes. Validation (checkpoint choice): ``val_per_host`` painted variants of the first two
    training hosts with held-out lesion shapes. Evaluation patients are never read here.

    Returns
    -------
    (list of Case, list of Case)
    """
    train_bank, held_bank = bank.split(held_out_fraction)
    train: list[Case] = []
    val: list[Case] = []
    for hi, h in enumerate(x for x in HOSTS if x.split == "train"):
        key = f"real|{h.folder}|{spacing_mm}|{painted_per_host}|{val_per_host}|{held_out_fraction}|v2"

        def build(h: Host = h, hi: int = hi) -> list[Case] | None:
            host = cached_host(root, h, spacing_mm, cache_dir)
            if host is None:
                return None
            cases = host_cases(host, painted_per_host, train_bank, 1000 * hi, "real-train")
            if hi < 2:
                cases += host_cases(host, val_per_host, held_bank, 500_000 + 1000 * hi, "real-val",
                                    include_unmodified=False)
            return cases

        n_all = 1 + painted_per_host + (val_per_host if hi < 2 else 0)
        cases = _cached_cases(cache_dir, key, n_all, build)
        if cases is None:
            log(f"host {root / h.folder} missing (and not cached): skipped")
            continue
        n_train = 1 + painted_per_host
        train += cases[:n_train]
        val += cases[n_train:]
        log(f"host {h.folder} ({h.patient}): {n_train} training cases, {len(cases) - n_train} "
            f"validation, shape {cases[0].hu.shape}")
    return train, val
