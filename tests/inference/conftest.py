"""Fixtures of the inference tests: tiny random-weights bundles and copies of the real chest CT."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lungnode.inference.checkpoint import BundleMetadata, save_bundle
from lungnode.inference.model import ModelConfig, build_model

TINY = ModelConfig(encoder="r3d_18", encoder_depth=2, in_channels=3, num_classes=2, final_channels=4)


def make_bundle(path: Path, cfg: ModelConfig = TINY, classes: tuple[str, ...] = ("background", "infiltrate"),
                weights_dtype: str = "float16", seed: int = 0, **meta: object) -> Path:
    """Write a random-weights bundle (coarse grid so CPU tests stay fast)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    md = BundleMetadata(name="tiny-test", version="0.0.1", model=cfg, classes=classes,
                        spacing_mm=(8.0, 6.0, 6.0), patch_size=(32, 64, 64),
                        weights_dtype=weights_dtype, **meta)  # type: ignore[arg-type]
    save_bundle(path, model, md)
    return path


@pytest.fixture(scope="session")
def bundle_factory() -> object:
    """The :func:`make_bundle` helper (test modules cannot import conftest)."""
    return make_bundle


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors")


@pytest.fixture
def chest_copy(chest_ct_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the real 30-slice chest CT."""
    if not chest_ct_dir.is_dir():
        pytest.skip(f"{chest_ct_dir} absent")
    dst = tmp_path / "chest"
    shutil.copytree(chest_ct_dir, dst)
    return dst
