"""Where a recipe's cases come from: phantom sets or datasets on disk, split into train/validation.

This module owns the seeds and splits that keep evaluation honest: phantom training cases use
lesion shapes from the first MosMed studies, validation and held-out test phantoms use the last
``held_out_fraction`` of studies (never seen in training) and disjoint seed ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lungnode.training.cases import Case, default_lesion_bank, phantom_cases
from lungnode.training.phantom import PhantomOptions
from lungnode.training.recipe import Recipe

__all__ = ["TEST_SEED0", "TRAIN_SEED0", "VAL_SEED0", "held_out_phantoms", "recipe_cases"]

TRAIN_SEED0 = 0
VAL_SEED0 = 500_000
TEST_SEED0 = 900_000


def _options(recipe: Recipe) -> PhantomOptions:
    d = recipe.data
    return PhantomOptions(shape=tuple(d.phantom_shape), spacing_mm=tuple(d.spacing_mm),  # type: ignore[arg-type]
                          max_lesions=d.max_lesions)


def recipe_cases(recipe: Recipe, log: Callable[[str], None] = print) -> tuple[list[Case], list[Case]]:
    """Training and validation cases at the recipe's spacing.

    Returns
    -------
    (list of Case, list of Case)
    """
    d = recipe.data
    cache = Path(d.cache_dir) if d.cache_dir else None
    if d.source == "phantom":
        bank = default_lesion_bank(d.lesion_bank)
        train_bank, held = bank.split(d.held_out_fraction)
        log(f"lesion bank: {len(train_bank)} shapes from {len(train_bank.studies)} studies for training, "
            f"{len(held)} from {len(held.studies)} held-out studies ({held.studies[0]}..{held.studies[-1]})")
        opts = _options(recipe)
        train = phantom_cases(d.phantom_train, train_bank, opts, TRAIN_SEED0, "train", "phantom",
                              d.workers, cache)
        val = phantom_cases(d.phantom_val, held, opts, VAL_SEED0, "val", "phantom-heldout", d.workers, cache)
        return train, val
    if d.source == "real":
        from lungnode.training.realcases import default_real_root, real_cases

        bank = default_lesion_bank(d.lesion_bank)
        root = Path(d.real_root) if d.real_root else default_real_root()
        repo = Path(__file__).resolve().parents[2]
        cache_real = cache if cache is not None else repo / ".cache" / "cases"
        train, val = real_cases(root, tuple(d.spacing_mm), bank, d.held_out_fraction,  # type: ignore[arg-type]
                                d.painted_per_host, d.val_per_host, cache_real, log)
        if d.phantom_train > 0:  # phantoms may stay in the mix
            train_bank, _ = bank.split(d.held_out_fraction)
            train += phantom_cases(d.phantom_train, train_bank, _options(recipe), TRAIN_SEED0, "train",
                                   "phantom", d.workers, cache_real)
        return train, val
    from lungnode.training.datasets import split_cases

    return split_cases(recipe, log)


def held_out_phantoms(n: int, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float],
                      lesion_bank: str = "", held_out_fraction: float = 0.2,
                      workers: int = 0) -> list[Case]:
    """Test phantoms whose lesion shapes come only from held-out MosMed studies."""
    bank = default_lesion_bank(lesion_bank)
    _, held = bank.split(held_out_fraction)
    return phantom_cases(n, held, PhantomOptions(shape=shape, spacing_mm=spacing_mm), TEST_SEED0, "test",
                         "phantom-heldout", workers)
