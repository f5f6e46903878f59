"""Lobe labels from a model bundle that declares the lobe classes.

A site that trains lobes from its own DICOM SEG adds the classes
:data:`~lungnode.inference.regions.LOBE_CLASSES` (``lobe_rul``, ``lobe_rml``, ``lobe_rll``,
``lobe_lul``, ``lobe_lll``) to the bundle; :func:`has_lobes` then says yes and
:func:`predict_lobe_labels` gives every voxel the lobe whose channel is most probable (on the
model grid, nearest-neighbour back to the source grid; background where no lobe channel beats the
other channels).

Cost: this is a second sliding-window pass of the same network (the engine's own pass keeps only
the lung and infiltrate channels; folding the lobes into that pass is a change to ``engine.py``,
left to its owner). Bundles without lobe classes never pay it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from lungnode.inference.checkpoint import BundleMetadata
from lungnode.inference.predict import (
    labels_to_source,
    model_grid,
    predict_probabilities,
    resample_to_model_grid,
    valid_patch_size,
)
from lungnode.inference.regions import LOBE_CLASSES
from lungnode.inference.types import SeriesVolume

__all__ = ["has_lobes", "predict_lobe_labels"]


def has_lobes(meta: BundleMetadata) -> bool:
    """Whether the bundle declares all five lobe classes."""
    return all(c in meta.classes for c in LOBE_CLASSES)


def predict_lobe_labels(engine: Any, volume: SeriesVolume) -> npt.NDArray[np.uint8]:
    """Lobe labels 0-5 (:data:`~lungnode.inference.regions.LOBES` order) on the source grid.

    Parameters
    ----------
    engine:
        A loaded :class:`~lungnode.inference.engine.InferenceEngine` whose bundle has lobes.
    volume:
        The series.

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels; pass them to :func:`~lungnode.inference.regions.lobe_regions`.

    Raises
    ------
    ValueError
        The engine's bundle has no lobe classes.
    """
    meta: BundleMetadata = engine.metadata
    if not has_lobes(meta):
        raise ValueError(f"model {meta.name} declares no lobe classes")
    grid = model_grid(volume.hu.shape, volume.slice_positions(),
                      (volume.spacing_mm[1], volume.spacing_mm[2]), meta.spacing_mm)
    x = resample_to_model_grid(volume.hu, grid, device=engine.device)
    patch = valid_patch_size(engine.options.patch_size or meta.patch_size, grid.shape,
                             engine.model.divisor, meta.overlap)
    probs = predict_probabilities(engine.model, x, patch, overlap=meta.overlap,
                                  activation=meta.activation, device=engine.device,
                                  channels_last=engine.options.channels_last)
    lobe_idx = [meta.classes.index(c) for c in LOBE_CLASSES]
    other_idx = [i for i in range(len(meta.classes)) if i not in lobe_idx]
    with torch.inference_mode():
        lobe_p = probs[lobe_idx]
        best, which = lobe_p.max(dim=0)
        if meta.activation == "softmax":
            # softmax: background/infiltrate channels compete; infiltrate lies inside a lobe, so
            # a voxel is lobe when all lobe channels together beat the background channel
            bg = probs[meta.classes.index("background")] if "background" in meta.classes \
                else probs[other_idx].max(dim=0).values
            inside = lobe_p.sum(dim=0) > bg
        else:
            inside = best > 0.5
        small = torch.where(inside, which + 1, 0).to(torch.uint8).cpu().numpy()
    return labels_to_source(small, grid)
