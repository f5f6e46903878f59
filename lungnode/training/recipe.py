"""Training recipes: one TOML file describes a whole run (data, model, stages, augmentation, export).

This module owns the recipe schema and its validation. The shipped recipes live beside it in
``lungnode/training/recipes/``: ``reference.toml`` (Bressem et al. 2021), ``native.toml`` (native
spacing patches + the node's sliding-window inference), ``demo.toml`` (the former phantom-only demo model)
and ``ct.toml`` (the bundled model lungnode-ct, real-anatomy cases).

Sections
--------
``[data]``      where cases come from (``source = "phantom"``, ``"datasets"`` or ``"real"``: real
                chest CT hosts with painted lesions, :mod:`.realcases`), spacing, splits.
``[model]``     :class:`lungnode.inference.model.ModelConfig` fields.
``[labels]``    output classes and activation (``sigmoid``: independent ``lung``/``infiltrate``).
``[[stages]]``  one block per stage: epochs, lr, batch, patch, ``mode`` (``resize``: whole volume
                resized to the patch, as the paper; ``patch``: random patches at native spacing),
                ``freeze_encoder``.
``[augment]``   rotation, flip, scale, perspective, contrast/brightness, noise.
``[train]``     AMP, torch.compile, validation cadence, pretrained encoder, seed.
``[export]``    name, version and inference defaults written into the bundle.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lungnode.inference.model import ModelConfig

__all__ = [
    "RECIPES_DIR",
    "AugmentSpec",
    "DataSpec",
    "ExportSpec",
    "LabelSpec",
    "Recipe",
    "RecipeError",
    "StageSpec",
    "TrainSpec",
    "load_recipe",
    "recipe_from_dict",
]

RECIPES_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    """A recipe file with a missing, unknown or invalid key."""


@dataclass(frozen=True)
class DataSpec:
    """Where training cases come from."""

    source: str = "phantom"
    spacing_mm: tuple[float, float, float] = (2.5, 2.0, 2.0)
    #: phantom source
    phantom_train: int = 64
    phantom_val: int = 8
    phantom_shape: tuple[int, int, int] = (64, 176, 176)
    max_lesions: int = 10
    #: ``.npz`` lesion bank or a MosMed ``masks/`` folder; empty = ``$LUNGNODE_LESIONS`` or
    #: ``../shared/data/masks/mosmed`` beside the repository.
    lesion_bank: str = ""
    held_out_fraction: float = 0.2
    #: datasets source: list of ``{kind = ..., root = ...}`` tables (see :mod:`.datasets`)
    datasets: tuple[dict[str, Any], ...] = ()
    split_file: str = ""
    val_fraction: float = 0.2
    cache_dir: str = ""
    workers: int = 0
    #: real source (:mod:`.realcases`): host folder root (empty = ``../shared/data/ct``), painted
    #: variants per training host, validation variants (held-out lesion shapes) per host
    real_root: str = ""
    painted_per_host: int = 8
    val_per_host: int = 1


@dataclass(frozen=True)
class LabelSpec:
    """Output channels."""

    classes: tuple[str, ...] = ("lung", "infiltrate")
    activation: str = "sigmoid"


@dataclass(frozen=True)
class StageSpec:
    """One training stage."""

    name: str = "train"
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch: int = 2
    patch: tuple[int, int, int] = (32, 128, 128)
    mode: str = "patch"
    freeze_encoder: bool = False
    iters_per_epoch: int = 0
    lesion_focus: float = 0.5


@dataclass(frozen=True)
class AugmentSpec:
    """Augmentation strengths (all applied on the training device)."""

    rotate_deg: float = 10.0
    flip_lr: bool = True
    scale: tuple[float, float] = (0.85, 1.15)
    perspective: float = 0.03
    contrast: tuple[float, float] = (0.9, 1.1)
    brightness_hu: float = 30.0
    noise_hu: tuple[float, float] = (0.0, 20.0)
    probability: float = 0.8


@dataclass(frozen=True)
class TrainSpec:
    """Run-level options."""

    seed: int = 0
    amp: bool = True
    compile: bool = False
    val_every: int = 1
    val_overlap: float = 0.25
    pretrained: str = ""
    pretrained_kind: str = "kinetics"
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    best_metric: str = "dice_infiltrate"
    #: stop after the epoch during which this many seconds of training have passed (0 = no limit)
    time_limit_s: float = 0.0
    #: start from the weights of an existing bundle (every tensor whose name and shape match)
    init_bundle: str = ""
    #: SHA-256 the pretrained encoder file must have (empty = not checked)
    pretrained_sha256: str = ""


@dataclass(frozen=True)
class ExportSpec:
    """Bundle defaults."""

    name: str = "lungnode-model"
    version: str = "0.1.0"
    patch_size: tuple[int, int, int] = (48, 160, 160)
    overlap: float = 0.25
    threshold: float = 0.5
    fp16: bool = True
    notes: str = ""


@dataclass(frozen=True)
class Recipe:
    """A whole training run."""

    name: str
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: LabelSpec = field(default_factory=LabelSpec)
    stages: tuple[StageSpec, ...] = (StageSpec(),)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    source: str = ""


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"[{where}] unknown keys {unknown}; known: {sorted(known)}")
    kw: dict[str, Any] = {}
    for k, v in data.items():
        default = getattr(cls(), k)
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(dict(x) if isinstance(x, dict) else x for x in v)
        kw[k] = v
    try:
        return cls(**kw)
    except TypeError as exc:
        raise RecipeError(f"[{where}] {exc}") from exc


def recipe_from_dict(d: dict[str, Any], source: str = "") -> Recipe:
    """Build and validate a recipe from parsed TOML."""
    d = dict(d)
    name = d.pop("name", None)
    if not isinstance(name, str) or not name:
        raise RecipeError("recipe needs a top-level 'name'")
    sections = {"data": DataSpec, "labels": LabelSpec, "augment": AugmentSpec, "train": TrainSpec,
                "export": ExportSpec}
    kw: dict[str, Any] = {"name": name, "source": source}
    for key, cls in sections.items():
        kw[key] = _build(cls, d.pop(key, {}), key)
    try:
        kw["model"] = ModelConfig.from_dict(d.pop("model", {}))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"[model] {exc}") from exc
    stages = d.pop("stages", [{}])
    kw["stages"] = tuple(_build(StageSpec, s, f"stages.{i}") for i, s in enumerate(stages))
    if d:
        raise RecipeError(f"unknown top-level keys {sorted(d)}")
    r = Recipe(**kw)
    _validate(r)
    return r


def _validate(r: Recipe) -> None:
    if r.data.source not in ("phantom", "datasets", "real"):
        raise RecipeError(f"[data] source must be 'phantom', 'datasets' or 'real', "
                          f"not {r.data.source!r}")
    if r.labels.activation not in ("sigmoid", "softmax"):
        raise RecipeError("[labels] activation must be 'sigmoid' or 'softmax'")
    if len(r.labels.classes) != r.model.num_classes:
        raise RecipeError(f"[labels] {len(r.labels.classes)} classes but [model] num_classes = "
                          f"{r.model.num_classes}")
    if "infiltrate" not in r.labels.classes:
        raise RecipeError("[labels] classes must include 'infiltrate'")
    for c in r.labels.classes:
        if c not in ("background", "lung", "infiltrate"):
            raise RecipeError(f"[labels] unknown class {c!r}")
    if r.labels.activation == "softmax" and r.labels.classes[0] != "background":
        raise RecipeError("[labels] softmax classes must start with 'background'")
    for i, s in enumerate(r.stages):
        if s.mode not in ("patch", "resize"):
            raise RecipeError(f"[stages.{i}] mode must be 'patch' or 'resize'")
        if s.epochs < 0 or s.batch < 1 or s.lr <= 0 or len(s.patch) != 3:
            raise RecipeError(f"[stages.{i}] needs epochs >= 0, batch >= 1, lr > 0, 3-value patch")
    if len(r.data.spacing_mm) != 3 or min(r.data.spacing_mm) <= 0:
        raise RecipeError("[data] spacing_mm must be three positive numbers")


def load_recipe(path: Path | str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file (a path, or the name of a shipped recipe such as ``"demo"``).

    Parameters
    ----------
    path:
        TOML file, or a shipped recipe's stem.
    overrides:
        Dotted keys replacing values, e.g. ``{"stages.0.epochs": 1, "data.phantom_train": 4}``.
    """
    p = Path(path)
    if not p.is_file() and (RECIPES_DIR / f"{path}.toml").is_file():
        p = RECIPES_DIR / f"{path}.toml"
    if not p.is_file():
        raise RecipeError(f"recipe {path} not found (shipped: "
                          f"{sorted(q.stem for q in RECIPES_DIR.glob('*.toml'))})")
    with open(p, "rb") as fh:
        d = tomllib.load(fh)
    for key, value in (overrides or {}).items():
        node: Any = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return recipe_from_dict(d, str(p))
