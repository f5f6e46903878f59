"""Montage PNGs: axial slices of a CT with lung and infiltrate outlines (for looking at cases).

This module owns the one picture used to check training targets and evaluation results by eye:
``n`` axial slices evenly spread over the lungs, lung window, the lung outline in one colour per
side, the infiltrate (truth and/or prediction) outlined on top. matplotlib comes with the
``train`` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["save_montage"]


def save_montage(
    path: Path, hu: npt.NDArray[np.generic], lung: npt.NDArray[np.generic] | None,
    truth: npt.NDArray[np.bool_] | None = None, pred: npt.NDArray[np.bool_] | None = None,
    n: int = 8, title: str = "", aspect: float = 1.0,
) -> None:
    """Write a montage of ``n`` axial slices with outlines.

    Parameters
    ----------
    path:
        Output PNG.
    hu:
        ``(D, H, W)`` HU.
    lung:
        Lung labels (1 right red, 2 left blue; any other non-zero yellow) or ``None``.
    truth:
        Infiltrate truth (green outline).
    pred:
        Predicted infiltrate (magenta outline).
    n:
        Number of slices.
    title:
        Figure title.
    aspect:
        Row/column pixel aspect.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = np.asarray(lung, dtype=bool) if lung is not None else np.asarray(hu) > -400
    zs = np.nonzero(ref.any(axis=(1, 2)))[0]
    if truth is not None and truth.any():  # include the slices with the most lesion
        zs = np.nonzero(ref.any(axis=(1, 2)) | truth.any(axis=(1, 2)))[0]
    zs = zs if zs.size else np.arange(hu.shape[0])
    picks = np.unique(np.linspace(zs.min(), zs.max(), n + 2).round().astype(int)[1:-1])
    cols = min(4, len(picks))
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), picks, strict=False):
        ax.imshow(hu[k], cmap="gray", vmin=-1200, vmax=300, aspect=aspect, interpolation="nearest")
        if lung is not None:
            for val, colour in ((1, "red"), (2, "dodgerblue")):
                if (lung[k] == val).any():
                    ax.contour(lung[k] == val, [0.5], colors=colour, linewidths=0.6)
        for mask, colour in ((truth, "lime"), (pred, "magenta")):
            if mask is not None and mask[k].any():
                ax.contour(mask[k], [0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"slice {k}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
