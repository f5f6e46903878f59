"""Resampling between the source grid and the model grid, and sliding-window prediction.

This module owns the numerical path from a HU volume to probability maps:

* :func:`resample_to_model_grid` — separable resampling of a HU volume to the model's spacing:
  in-plane bilinear (antialiased when shrinking) chunk by chunk, then linear along the slice
  axis using the *true* slice positions (so accepted irregular spacing is honoured);
* :func:`predict_probabilities` — MONAI sliding-window inference with Gaussian blending,
  optional mirror test-time augmentation, bf16 autocast and ``channels_last_3d`` on CUDA,
  float32 on CPU;
* :func:`probabilities_to_source_mask` — maps a probability map back onto the source grid slab by
  slab and thresholds it, so no full-size float copy of the source volume is ever made.

Grids: the model grid spans the same physical extent as the source grid (first and last voxel
centres coincide, ``align_corners`` convention); its spacing is the requested spacing adjusted so
that an integer number of voxels fits.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelGrid",
    "labels_to_source",
    "model_grid",
    "predict_probabilities",
    "probabilities_to_source_mask",
    "resample_to_model_grid",
    "valid_patch_size",
]


@dataclass(frozen=True)
class ModelGrid:
    """Geometry of the model grid relative to the source grid.

    Attributes
    ----------
    shape:
        ``(D, H, W)`` of the model grid.
    z_positions_mm:
        Positions of model-grid slices along the normal (relative to the first source slice).
    source_z_mm:
        Positions of the source slices (same origin).
    source_shape:
        ``(slices, rows, columns)`` of the source grid.
    """

    shape: tuple[int, int, int]
    z_positions_mm: npt.NDArray[np.float64]
    source_z_mm: npt.NDArray[np.float64]
    source_shape: tuple[int, int, int]


def _n_points(extent_mm: float, spacing_mm: float) -> int:
    return max(1, round(extent_mm / spacing_mm) + 1)


def model_grid(
    source_shape: tuple[int, int, int],
    source_z_mm: npt.NDArray[np.float64],
    pixel_spacing_mm: tuple[float, float],
    target_spacing_mm: tuple[float, float, float],
) -> ModelGrid:
    """Compute the model grid for a source volume.

    Parameters
    ----------
    source_shape:
        ``(slices, rows, columns)``.
    source_z_mm:
        Slice positions along the normal (increasing).
    pixel_spacing_mm:
        ``(row spacing, column spacing)``.
    target_spacing_mm:
        Model spacing ``(slice, row, column)``.

    Returns
    -------
    ModelGrid
    """
    n, h, w = source_shape
    dz = _n_points(float(source_z_mm[-1] - source_z_mm[0]), target_spacing_mm[0])
    dh = _n_points((h - 1) * pixel_spacing_mm[0], target_spacing_mm[1])
    dw = _n_points((w - 1) * pixel_spacing_mm[1], target_spacing_mm[2])
    zt = np.linspace(float(source_z_mm[0]), float(source_z_mm[-1]), dz)
    return ModelGrid((dz, dh, dw), zt, np.asarray(source_z_mm, np.float64), (n, h, w))


def _lerp_weights(
    src: npt.NDArray[np.float64], dst: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Lower index and weight of the upper neighbour for linear interpolation src -> dst."""
    if src.size == 1:
        return np.zeros(dst.size, np.int64), np.zeros(dst.size, np.float32)
    k = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, src.size - 2)
    w = (dst - src[k]) / (src[k + 1] - src[k])
    return k.astype(np.int64), np.clip(w, 0.0, 1.0).astype(np.float32)


def _resize2d(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, H, W)`` slices, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=True,
                         antialias=shrink)[:, 0]


def resample_to_model_grid(
    hu: npt.NDArray[np.float32], grid: ModelGrid, chunk: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Resample a HU volume onto the model grid.

    Parameters
    ----------
    hu:
        Source volume ``(slices, rows, columns)``.
    grid:
        From :func:`model_grid`.
    chunk:
        Source slices processed at once (bounds temporary memory).
    device:
        Where to compute and return the result (the source stays in host memory).

    Returns
    -------
    torch.Tensor
        ``float32`` ``(D, H, W)`` on ``device``.
    """
    dev = torch.device(device)
    _, dh, dw = grid.shape
    planar = torch.empty((hu.shape[0], dh, dw), dtype=torch.float32, device=dev)
    for s in range(0, hu.shape[0], chunk):
        src = torch.from_numpy(np.ascontiguousarray(hu[s : s + chunk])).to(dev)
        planar[s : s + chunk] = _resize2d(src, (dh, dw))
    k, w = _lerp_weights(grid.source_z_mm, grid.z_positions_mm)
    if hu.shape[0] == 1:
        return planar.expand(grid.shape[0], -1, -1).clone()
    wt = torch.from_numpy(w).to(dev)[:, None, None]
    kt = torch.from_numpy(k).to(dev)
    return planar[kt] * (1 - wt) + planar[kt + 1] * wt


def valid_patch_size(
    patch: Sequence[int],
    volume_shape: Sequence[int],
    divisor: Sequence[int],
    overlap: float = 0.0,
) -> tuple[int, int, int]:
    """Balanced sliding-window patch: multiples of ``divisor``, no larger than ``patch``.

    For each axis the number of windows that the largest allowed patch needs is kept, and the
    patch is shrunk to the smallest multiple of the divisor that still covers the axis with that
    many windows at the requested overlap. This avoids computing mostly padding (e.g. a 160-voxel
    patch on a 207-voxel axis needs 2 windows; 112 voxels suffice for 2 windows).

    Parameters
    ----------
    patch:
        Largest allowed patch ``(D, H, W)`` (memory bound).
    volume_shape:
        Model-grid shape.
    divisor:
        Network divisor per axis (:attr:`UNet3D.divisor`).
    overlap:
        Sliding-window overlap (0-1).

    Returns
    -------
    tuple of int
    """
    out = []
    for p, v, d in zip(patch, volume_shape, divisor, strict=True):
        p_max = max(d, (int(p) // d) * d)
        v_ceil = -(-int(v) // d) * d
        if v_ceil <= p_max:
            out.append(v_ceil)
            continue
        step = max(1, int(p_max * (1 - overlap)))
        n = -(-(int(v) - p_max) // step) + 1
        need = int(np.ceil(int(v) / (n - (n - 1) * overlap)))
        out.append(min(p_max, -(-need // d) * d))
    return (out[0], out[1], out[2])


class _Predictor(nn.Module):
    """Model + activation + optional mirror TTA, returning probabilities for a batch of patches."""

    def __init__(self, model: nn.Module, activation: str, tta_axes: Sequence[int],
                 channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.activation = activation
        self.flips: list[tuple[int, ...]] = [()]
        axes = [a + 2 for a in tta_axes]  # (D, H, W) -> tensor dims
        for r in range(1, len(axes) + 1):
            self.flips += [tuple(c) for c in itertools.combinations(axes, r)]
        self.channels_last = channels_last

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        logits = self.model(x).float()
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc: torch.Tensor | None = None
        for dims in self.flips:
            p = self._probs(torch.flip(x, dims) if dims else x)
            p = torch.flip(p, dims) if dims else p
            acc = p if acc is None else acc + p
        assert acc is not None
        return acc / len(self.flips)


def predict_probabilities(
    model: nn.Module,
    hu_grid: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.25,
    activation: str = "softmax",
    device: torch.device | str = "cpu",
    tta_axes: Sequence[int] = (),
    sw_batch_size: int = 1,
    pad_hu: float = -1024.0,
    channels_last: bool = True,
) -> torch.Tensor:
    """Sliding-window probabilities on the model grid.

    Parameters
    ----------
    model:
        Network taking raw HU ``(N, 1, D, H, W)`` and returning logits (already on ``device``).
    hu_grid:
        ``(D, H, W)`` HU on the model grid (CPU or ``device``).
    patch_size:
        Window ``(D, H, W)`` (use :func:`valid_patch_size`).
    overlap:
        Fraction of overlap between windows.
    activation:
        ``"softmax"`` or ``"sigmoid"``.
    device:
        Where windows are computed. On CUDA: bf16 autocast and ``channels_last_3d``.
    tta_axes:
        Mirror test-time augmentation over these axes (0=D, 1=H, 2=W): every combination of
        flips is averaged (``(2,)`` = 2 passes, ``(0, 1, 2)`` = 8 passes).
    sw_batch_size:
        Windows per forward pass.
    pad_hu:
        HU used where windows extend past the volume.
    channels_last:
        Feed windows as ``channels_last_3d`` (faster with oneDNN on CPU and cuDNN on GPU; the
        model should be converted with ``model.to(memory_format=torch.channels_last_3d)``).

    Returns
    -------
    torch.Tensor
        ``float32`` probabilities ``(C, D, H, W)`` on ``device``.
    """
    from monai.inferers import sliding_window_inference

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    predictor = _Predictor(model, activation, tta_axes, channels_last=channels_last)
    x = hu_grid[None, None].to(dev)
    with torch.inference_mode(), torch.autocast(
        device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda
    ):
        out = sliding_window_inference(
            x,
            roi_size=tuple(int(v) for v in patch_size),
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=pad_hu,
            sw_device=dev,
            device=dev,
        )
    assert isinstance(out, torch.Tensor)
    return out[0].float()


def probabilities_to_source_mask(
    prob: torch.Tensor, grid: ModelGrid, threshold: float, chunk: int = 16
) -> npt.NDArray[np.bool_]:
    """Resample one probability map back onto the source grid and threshold it.

    Parameters
    ----------
    prob:
        ``(D, H, W)`` probabilities on the model grid (CPU or CUDA; computed where it lives).
    grid:
        The grid the probabilities live on.
    threshold:
        Voxels with probability ``> threshold`` are set.
    chunk:
        Source slices produced at once.

    Returns
    -------
    numpy.ndarray
        ``bool`` mask ``(slices, rows, columns)`` on the source grid.
    """
    n, h, w = grid.source_shape
    out = np.zeros((n, h, w), dtype=np.bool_)
    k, wt = _lerp_weights(grid.z_positions_mm, grid.source_z_mm)
    p = prob.float()
    kt, wtt = torch.from_numpy(k).to(p.device), torch.from_numpy(wt).to(p.device)
    for s in range(0, n, chunk):
        kk = kt[s : s + chunk]
        ww = wtt[s : s + chunk][:, None, None]
        slab = p[kk] if p.shape[0] == 1 else p[kk] * (1 - ww) + p[kk + 1] * ww
        slab = F.interpolate(slab[:, None], size=(h, w), mode="bilinear", align_corners=True)[:, 0]
        out[s : s + chunk] = (slab > threshold).cpu().numpy()
    return out


def labels_to_source(labels: npt.NDArray[np.uint8], grid: ModelGrid) -> npt.NDArray[np.uint8]:
    """Map a label image from a work grid back to the source grid (nearest neighbour).

    Parameters
    ----------
    labels:
        ``uint8`` labels ``(D, H, W)`` on ``grid``.
    grid:
        The grid the labels live on (same extent as the source grid).

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels on the source grid.
    """
    n, h, w = grid.source_shape
    _, h_w, w_w = labels.shape
    zi = np.abs(grid.source_z_mm[:, None] - grid.z_positions_mm[None, :]).argmin(axis=1)
    ri = np.rint(np.arange(h) * (h_w - 1) / max(h - 1, 1)).astype(np.intp)
    ci = np.rint(np.arange(w) * (w_w - 1) / max(w - 1, 1)).astype(np.intp)
    out = np.empty((n, h, w), dtype=np.uint8)
    for k in range(n):
        out[k] = labels[zi[k]].take(ri, axis=0).take(ci, axis=1)
    return out
