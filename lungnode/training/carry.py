"""A compact training set for a lent GPU machine: hosts, lesion shapes and encoder in one folder.

This module owns ``python -m lungnode.training pack``. A GPU machine gets a copy of the working tree
of at most 64 MiB and no ``../shared``; the painted cases (about 220 MB for the shipped recipe) do
not fit, but what they are made from does: the training hosts on the model grid (int16 HU and lung
labels, cropped, :func:`~lungnode.training.realcases.cached_host`), the MosMed lesion bank and the
truncated CT-pretrained encoder. ``pack`` writes them where a recipe such as ``recipes/ct-gpu.toml``
looks for them (``data.cache_dir``, ``data.lesion_bank``, ``train.pretrained``), so that the recipe
paints its cases on the GPU machine's CPUs and trains there with one command. Only training patients
are packed; evaluation runs back on the CPU through ``bench.model_real``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from lungnode.training.cases import default_lesion_bank
from lungnode.training.realcases import (
    HOSTS,
    default_real_root,
    host_cache_path,
    load_host,
    save_host,
)
from lungnode.training.recipe import Recipe

__all__ = ["CARRY_LIMIT_BYTES", "HU_STEP", "pack_training_set"]

#: the packed set's share of the 64 MiB a lent machine receives (the tracked tree, with the
#: bundled model, is about 30 MiB)
CARRY_LIMIT_BYTES = 32 * 1024 * 1024
#: HU rounding of the packed hosts (at most 2 HU off; see :func:`~.realcases.save_host`)
HU_STEP = 4


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def pack_training_set(recipe: Recipe, encoder: Path | None, real_root: Path | None = None,
                      log: Callable[[str], None] = print) -> list[Path]:
    """Write the recipe's hosts, lesion bank and pretrained encoder to the places it names.

    Parameters
    ----------
    recipe:
        A ``source = "real"`` recipe whose ``data.cache_dir``, ``data.lesion_bank`` and (when it
        uses one) ``train.pretrained`` point inside the folder that will travel.
    encoder:
        The truncated encoder file to copy to ``train.pretrained`` (e.g. the output of
        ``prepare-encoder``); ``None`` when the recipe has no pretrained encoder.
    real_root:
        Folder holding the host series (default ``../shared/data/ct``).

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    ValueError
        The recipe is not a real-anatomy recipe, lacks the paths, or the set exceeds
        :data:`CARRY_LIMIT_BYTES`.
    """
    d = recipe.data
    if d.source != "real" or not d.cache_dir or not d.lesion_bank.endswith(".npz"):
        raise ValueError("pack needs a real-anatomy recipe with data.cache_dir and an .npz data.lesion_bank")
    root = real_root or (Path(d.real_root) if d.real_root else default_real_root())
    cache = Path(d.cache_dir)
    spacing = (float(d.spacing_mm[0]), float(d.spacing_mm[1]), float(d.spacing_mm[2]))
    written: list[Path] = []
    for h in (x for x in HOSTS if x.split == "train"):
        folder = root / h.folder
        if not folder.is_dir():
            raise ValueError(f"training host {folder} is missing")
        path = host_cache_path(cache, h, spacing)
        assert path is not None
        vol = load_host(folder, spacing)
        save_host(vol, path, hu_step=HU_STEP)
        written.append(path)
        log(f"host {h.folder}: {vol.hu.shape}, {path.stat().st_size / 2**20:.1f} MiB")
    bank_path = Path(d.lesion_bank)
    bank_path.parent.mkdir(parents=True, exist_ok=True)
    default_lesion_bank("").save(bank_path)
    written.append(bank_path)
    if recipe.train.pretrained:
        if encoder is None or not encoder.is_file():
            raise ValueError(f"the recipe loads {recipe.train.pretrained}: give the encoder file to copy")
        dst = Path(recipe.train.pretrained)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if encoder.resolve() != dst.resolve():
            shutil.copyfile(encoder, dst)
        written.append(dst)
    total = _size(written)
    log(f"{len(written)} files, {total / 2**20:.1f} MiB")
    if total > CARRY_LIMIT_BYTES:
        raise ValueError(f"the packed set is {total / 2**20:.1f} MiB, over "
                         f"{CARRY_LIMIT_BYTES / 2**20:.0f} MiB")
    return written
