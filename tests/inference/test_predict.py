"""Resampling to and from the model grid, patch sizes, sliding window with TTA."""

from __future__ import annotations

import numpy as np
import torch

from lungnode.inference.model import ModelConfig, build_model
from lungnode.inference.predict import (
    model_grid,
    predict_probabilities,
    probabilities_to_source_mask,
    resample_to_model_grid,
    valid_patch_size,
)


def test_round_trip_of_a_sphere_through_the_model_grid() -> None:
    n, h, w = 40, 96, 80
    z = np.arange(n, dtype=np.float64) * 1.25
    k, r, c = np.meshgrid(z, np.arange(h) * 0.7, np.arange(w) * 0.7, indexing="ij")
    sphere = (k - 25) ** 2 + (r - 33) ** 2 + (c - 28) ** 2 < 15**2
    hu = np.where(sphere, 100.0, -900.0).astype(np.float32)
    grid = model_grid(hu.shape, z, (0.7, 0.7), (3.0, 1.6, 1.6))
    assert grid.shape == (17, 43, 36)
    x = resample_to_model_grid(hu, grid)
    assert x.shape == grid.shape and x.dtype == torch.float32
    prob = (x + 900) / 1000  # a "probability" of the sphere
    back = probabilities_to_source_mask(prob, grid, 0.5)
    dice = 2 * np.sum(back & sphere) / (back.sum() + sphere.sum())
    assert back.shape == hu.shape and dice > 0.95


def test_irregular_positions_are_honoured() -> None:
    z = np.array([0.0, 1.0, 2.0, 5.0, 6.0])
    hu = np.broadcast_to(z[:, None, None], (5, 4, 4)).astype(np.float32).copy()  # HU = position
    grid = model_grid(hu.shape, z, (1.0, 1.0), (1.0, 1.0, 1.0))
    x = resample_to_model_grid(hu, grid)
    assert np.allclose(x[:, 0, 0].numpy(), np.arange(7.0), atol=1e-5)


def test_valid_patch_sizes() -> None:
    assert valid_patch_size((64, 224, 224), (81, 207, 207), (8, 16, 16), 0.25) == (48, 208, 208)
    assert valid_patch_size((64, 224, 224), (20, 50, 50), (8, 16, 16), 0.25) == (24, 64, 64)
    assert valid_patch_size((16, 64, 64), (200, 300, 300), (2, 4, 4), 0.5) == (16, 60, 60)


def test_sliding_window_with_mirror_tta_gives_probabilities() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_depth=2, final_channels=8)).eval()
    x = torch.randn(10, 20, 18) * 300
    p = predict_probabilities(model, x, (8, 16, 16), overlap=0.25, tta_axes=(2,))
    assert p.shape == (2, 10, 20, 18)
    assert torch.allclose(p.sum(0), torch.ones(10, 20, 18), atol=1e-4)
    q = predict_probabilities(model, x, (8, 16, 16), overlap=0.25, activation="sigmoid",
                              channels_last=False)
    assert q.min() >= 0 and q.max() <= 1
