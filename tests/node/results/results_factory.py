"""Test helpers: a real :class:`InferenceResult` from the shared chest CT without the model.

The lung mask is a HU threshold (air-like voxels inside the body, split left/right at the middle
column), the infiltrate a ball inside the right lung: real geometry, real source references.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from lungnode.inference.dicom_io import read_series
from lungnode.inference.types import (
    LUNG_LEFT,
    LUNG_RIGHT,
    InferenceResult,
    Measurements,
    ModelInfo,
    RegionMeasurement,
    SeriesVolume,
)


def threshold_lungs(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Label lungs 1 (right: image left half) / 2 (left) from HU < -400 inside the body."""
    air = hu < -400
    body = hu > -500
    rows = np.any(body, axis=2)  # (slices, rows)
    cols = np.any(body, axis=1)  # (slices, cols)
    inside = np.zeros_like(air)
    for k in range(hu.shape[0]):
        r = np.flatnonzero(rows[k])
        c = np.flatnonzero(cols[k])
        if r.size and c.size:
            r0, r1 = r[0] + 20, r[-1] - 20
            c0, c1 = c[0] + 20, c[-1] - 20
            if r1 > r0 and c1 > c0:
                inside[k, r0:r1, c0:c1] = True
    lung = air & inside
    labels = np.zeros(hu.shape, dtype=np.uint8)
    mid = hu.shape[2] // 2
    labels[:, :, :mid][lung[:, :, :mid]] = LUNG_RIGHT
    labels[:, :, mid:][lung[:, :, mid:]] = LUNG_LEFT
    return labels


def ball_in(labels: npt.NDArray[np.uint8], side: int = LUNG_RIGHT,
            radius: int = 30) -> npt.NDArray[np.bool_]:
    """A ball-shaped infiltrate centred on the centroid of one lung, clipped to that lung."""
    idx = np.argwhere(labels == side)
    centre = idx.mean(axis=0)
    zz, yy, xx = np.ogrid[:labels.shape[0], :labels.shape[1], :labels.shape[2]]
    ball = ((zz - centre[0]) * 4) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
    return np.asarray(ball & (labels == side), dtype=bool)


def measure(volume: SeriesVolume, labels: npt.NDArray[np.uint8],
            infiltrate: npt.NDArray[np.bool_]) -> Measurements:
    """Volumes (mL) per side from voxel counts."""
    v = volume.voxel_volume_ml

    def region(mask: npt.NDArray[np.bool_]) -> RegionMeasurement:
        return RegionMeasurement(lung_ml=float(mask.sum() * v),
                                 infiltrate_ml=float((infiltrate & mask).sum() * v),
                                 ground_glass_ml=0.0, consolidation_ml=0.0)

    return Measurements(left=region(labels == LUNG_LEFT), right=region(labels == LUNG_RIGHT),
                        both=region(labels > 0))


def make_result(series_dir: Path, *, infiltrate: bool = True) -> InferenceResult:
    """Read ``series_dir`` and build an :class:`InferenceResult` with threshold masks."""
    files = sorted(p for p in series_dir.iterdir() if p.is_file())
    volume = read_series(files)
    labels = threshold_lungs(volume.hu)
    inf = ball_in(labels) if infiltrate else np.zeros(labels.shape, dtype=bool)
    return InferenceResult(volume=volume, lung_labels=labels, infiltrate=inf,
                           measurements=measure(volume, labels, inf),
                           model=ModelInfo(name="lungnode-test", version="0.0.1", sha256="0" * 64))


def make_tiny_bundle(path: Path) -> Path:
    """A random-weights model bundle on a coarse grid (fast on CPU) via the checkpoint API."""
    import torch

    from lungnode.inference.checkpoint import BundleMetadata, save_bundle
    from lungnode.inference.model import ModelConfig, build_model

    cfg = ModelConfig(encoder="r3d_18", encoder_depth=2, in_channels=3, num_classes=2,
                      final_channels=4)
    torch.manual_seed(0)
    save_bundle(path, build_model(cfg),
                BundleMetadata(name="tiny-random", version="0.0.1", model=cfg,
                               classes=("background", "infiltrate"), spacing_mm=(8.0, 6.0, 6.0),
                               patch_size=(32, 64, 64), weights_dtype="float16"))
    return path
