"""Export: a training checkpoint → the checkpoint bundle the node loads.

This module owns writing a trained model as a :mod:`lungnode.inference.checkpoint` bundle
(safetensors + JSON metadata): architecture from the recipe, classes and activation, spacing,
sliding-window defaults, training-data provenance, metrics (e.g. held-out phantom Dice), and
float16 storage when asked (half the size; the node loads float32).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import torch

from lungnode.inference.checkpoint import BundleMetadata, load_bundle, save_bundle
from lungnode.inference.model import build_model
from lungnode.training.recipe import Recipe

__all__ = ["bundle_metadata", "export_bundle"]


def bundle_metadata(recipe: Recipe, metrics: dict[str, Any] | None = None,
                    training_data: dict[str, Any] | None = None) -> BundleMetadata:
    """Bundle metadata for a recipe's model."""
    e = recipe.export
    return BundleMetadata(
        name=e.name, version=e.version, model=recipe.model, classes=tuple(recipe.labels.classes),
        activation=recipe.labels.activation, spacing_mm=tuple(recipe.data.spacing_mm),  # type: ignore[arg-type]
        patch_size=tuple(e.patch_size), overlap=e.overlap, threshold=e.threshold,  # type: ignore[arg-type]
        training_data=training_data or {"recipe": recipe.name, "source": recipe.data.source},
        metrics=metrics or {}, notes=e.notes,
        created=_dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        weights_dtype="float16" if e.fp16 else "float32",
    )


def export_bundle(
    recipe: Recipe,
    checkpoint: Path | str,
    out: Path | str,
    metrics: dict[str, Any] | None = None,
    training_data: dict[str, Any] | None = None,
) -> BundleMetadata:
    """Write a bundle from a ``best.pt``/``last.pt`` training checkpoint.

    Parameters
    ----------
    recipe:
        The recipe the checkpoint was trained with.
    checkpoint:
        Trainer checkpoint (``{"model": state_dict, ...}``).
    out:
        Bundle path (``.safetensors``).
    metrics, training_data:
        Stored in the metadata (the checkpoint's validation row is used when ``metrics`` is
        ``None``).

    Returns
    -------
    BundleMetadata
        As written; the file is read back once to check it loads.
    """
    ck = torch.load(Path(checkpoint), map_location="cpu", weights_only=False)
    model = build_model(recipe.model)
    model.load_state_dict(ck["model"])
    m = metrics if metrics is not None else {"validation": ck.get("metrics", {}), "epoch": ck.get("epoch")}
    meta = save_bundle(out, model, bundle_metadata(recipe, m, training_data))
    load_bundle(out)  # round trip: refuse to hand over a file the node cannot read
    return meta
