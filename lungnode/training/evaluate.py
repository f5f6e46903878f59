"""``training evaluate``: the paper's protocol on a bundle, through the node's own inference path.

This module owns evaluating a model bundle on cases: each case goes through exactly what the node
runs (resample to the model grid, MONAI sliding window, back to the source grid, threshold), then
Dice and normalised surface Dice (:mod:`.metrics`) per patient and class; results are
macro-averaged with standard deviation per dataset and written as ``results.csv`` (per case),
``summary.md`` / ``summary.csv`` (per dataset) and ``montage.png`` (best and worst cases).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from lungnode.inference.checkpoint import BundleMetadata
from lungnode.training.cases import Case
from lungnode.training.metrics import NSD_TOLERANCE_MM, dice_score, summarize, surface_dice

__all__ = ["CaseResult", "evaluate_cases", "predict_masks", "write_reports"]


@dataclass
class CaseResult:
    """Scores of one case plus the slice kept for the montage."""

    case_id: str
    dataset: str
    scores: dict[str, float]
    slice_hu: npt.NDArray[np.int16]
    slice_gt: npt.NDArray[np.bool_]
    slice_pred: npt.NDArray[np.bool_]


def predict_masks(model: nn.Module, meta: BundleMetadata, hu: npt.NDArray[np.float32],
                  spacing_mm: Sequence[float], device: str | torch.device = "cpu",
                  overlap: float | None = None) -> dict[str, npt.NDArray[np.bool_]]:
    """Lung and infiltrate masks on the source grid, the way the node computes them.

    Lung: ``p(lung) > threshold`` (sigmoid) or ``1 - p(background) > threshold`` (softmax).
    """
    from lungnode.inference.predict import (
        model_grid,
        predict_probabilities,
        probabilities_to_source_mask,
        resample_to_model_grid,
        valid_patch_size,
    )

    z = np.arange(hu.shape[0], dtype=np.float64) * float(spacing_mm[0])
    grid = model_grid(hu.shape, z, (float(spacing_mm[1]), float(spacing_mm[2])), meta.spacing_mm)
    hu_grid = resample_to_model_grid(np.ascontiguousarray(hu, np.float32), grid)
    patch = valid_patch_size(meta.patch_size, grid.shape, getattr(model, "divisor", (8, 16, 16)))
    probs = predict_probabilities(model, hu_grid, patch, overlap=meta.overlap if overlap is None else overlap,
                                  activation=meta.activation, device=device)
    out: dict[str, npt.NDArray[np.bool_]] = {}
    ii = meta.classes.index("infiltrate")
    out["infiltrate"] = probabilities_to_source_mask(probs[ii], grid, meta.threshold)
    if "lung" in meta.classes:
        p_lung = probs[meta.classes.index("lung")]
        if meta.activation == "softmax":
            p_lung = 1.0 - probs[meta.classes.index("background")]
        out["lung"] = probabilities_to_source_mask(p_lung, grid, meta.threshold)
    return out


def evaluate_cases(model: nn.Module, meta: BundleMetadata, cases: Sequence[Case],
                   device: str | torch.device = "cpu", nsd: bool = True,
                   log: Callable[[str], None] = print) -> list[CaseResult]:
    """Dice and NSD per case and class (classes the model and the case both have)."""
    results = []
    for c in cases:
        pred = predict_masks(model, meta, c.hu.astype(np.float32), c.spacing_mm, device)
        scores: dict[str, float] = {}
        for k, p in pred.items():
            gt = c.infiltrate if k == "infiltrate" else c.lung
            if gt is None:
                continue
            scores[f"dice_{k}"] = dice_score(p, gt)
            if nsd:
                scores[f"nsd_{k}"] = surface_dice(p, gt, c.spacing_mm, NSD_TOLERANCE_MM[k])
        sl = int(np.argmax(c.infiltrate.sum(axis=(1, 2)))) if c.infiltrate.any() else c.hu.shape[0] // 2
        results.append(CaseResult(c.case_id, c.dataset, scores, c.hu[sl].copy(), c.infiltrate[sl].copy(),
                                  pred["infiltrate"][sl].copy()))
        log(f"{c.dataset}/{c.case_id}: " + " ".join(f"{a}={b:.3f}" for a, b in scores.items()))
    return results


def summary_rows(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """Per-dataset macro mean ± SD of every score."""
    rows = []
    for ds in sorted({r.dataset for r in results}):
        sub = [r for r in results if r.dataset == ds]
        row: dict[str, Any] = {"dataset": ds, "cases": len(sub)}
        for key in sorted({k for r in sub for k in r.scores}):
            mean, sd = summarize([r.scores[key] for r in sub if key in r.scores])
            row[f"{key}_mean"] = round(mean, 4)
            row[f"{key}_sd"] = round(sd, 4)
        rows.append(row)
    return rows


def write_reports(results: Sequence[CaseResult], out_dir: Path | str,
                  montage_n: int = 3) -> list[dict[str, Any]]:
    """Write ``results.csv``, ``summary.csv``, ``summary.md`` and ``montage.png``; return summary rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in results for k in r.scores})
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "case", *keys])
        for r in results:
            w.writerow([r.dataset, r.case_id, *[f"{r.scores[k]:.4f}" if k in r.scores else "" for k in keys]])
    rows = summary_rows(results)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "summary.csv", "w", newline="") as fh:
        dw = csv.DictWriter(fh, fieldnames=cols)
        dw.writeheader()
        dw.writerows(rows)
    lines = ["| dataset | cases | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[f'{k}_mean']:.3f} ± {row[f'{k}_sd']:.3f}" if f"{k}_mean" in row else "–"
                 for k in keys]
        lines.append(f"| {row['dataset']} | {row['cases']} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _montage(results, out / "montage.png", montage_n)
    return rows


def _montage(results: Sequence[CaseResult], path: Path, n: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the [train] extra brings matplotlib; tables are written regardless
        return
    # rank cases that have infiltrate (an empty phantom predicted empty scores 1.0 but shows nothing)
    with_gt = [r for r in results if r.slice_gt.any()]
    ranked = sorted(with_gt if len(with_gt) >= 2 * n else results,
                    key=lambda r: r.scores.get("dice_infiltrate", 0.0))
    picks = [("worst", r) for r in ranked[:n]] + [("best", r) for r in ranked[::-1][:n]]
    if not picks:
        return
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4), squeeze=False)
    for ax, (tag, r) in zip(axes[0], picks, strict=False):
        ax.imshow(r.slice_hu, cmap="gray", vmin=-1200, vmax=300)
        if r.slice_gt.any():
            ax.contour(r.slice_gt, levels=[0.5], colors="lime", linewidths=0.8)
        if r.slice_pred.any():
            ax.contour(r.slice_pred, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{tag}: {r.case_id}\nDice {r.scores.get('dice_infiltrate', float('nan')):.3f}",
                     fontsize=8)
        ax.axis("off")
    fig.suptitle("infiltrate: ground truth (green) vs model (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
