"""End-to-end engine runs on the real 30-slice chest CT with tiny random-weights bundles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from lungnode.inference.checkpoint import BundleError, BundleMetadata, save_bundle
from lungnode.inference.dicom_io import SeriesError
from lungnode.inference.engine import EngineOptions, InferenceEngine, default_bundle_path, infer_folder
from lungnode.inference.geometry import GeometryError
from lungnode.inference.model import ModelConfig, build_model
from lungnode.inference.types import LUNG_LEFT, LUNG_RIGHT


def test_end_to_end_on_real_series(tiny_bundle: Path, chest_ct_dir: Path) -> None:
    engine = InferenceEngine(tiny_bundle, device="cpu")
    files = sorted(chest_ct_dir.glob("*.dcm"))
    res = engine.run(files[::-1])
    v = res.volume
    assert res.infiltrate.shape == res.lung_labels.shape == v.hu.shape == (30, 512, 512)
    assert res.infiltrate.dtype == np.bool_ and res.lung_labels.dtype == np.uint8
    # 1-01.dcm is the top slice (z = 312) and 1-30.dcm the bottom (z = 80): sorted by increasing
    # position along the normal (+z), the volume starts with 1-30.dcm whatever the input order
    assert v.source_files == tuple(reversed(files))
    assert res.lung_source == "threshold"
    assert not (res.infiltrate & (res.lung_labels == 0)).any()
    m, ml = res.measurements, v.voxel_volume_ml
    for region, lab in ((m.right, LUNG_RIGHT), (m.left, LUNG_LEFT)):
        assert region.lung_ml == pytest.approx(np.count_nonzero(res.lung_labels == lab) * ml)
        inside = res.infiltrate & (res.lung_labels == lab)
        assert region.infiltrate_ml == pytest.approx(np.count_nonzero(inside) * ml)
        assert region.ground_glass_ml + region.consolidation_ml <= region.infiltrate_ml + 1e-9
    assert m.both.lung_ml == pytest.approx(m.left.lung_ml + m.right.lung_ml)
    assert 0 <= m.both.percent_involved <= 100
    assert res.model.name == "tiny-test" and len(res.model.sha256) == 64
    assert {"read", "infer", "lung_mask"} <= set(res.seconds)
    # warm engine: a second run reuses the loaded model and gives the same answer
    again = engine.run(files)
    assert np.array_equal(again.infiltrate, res.infiltrate)


def test_model_lung_class_is_used(tmp_path: Path, chest_ct_dir: Path) -> None:
    cfg = ModelConfig(encoder_depth=2, num_classes=3, final_channels=8)
    model = build_model(cfg)
    with torch.no_grad():  # constant output: lung everywhere inside the body, no infiltrate
        model.head.weight.zero_()
        assert model.head.bias is not None
        model.head.bias.copy_(torch.tensor([0.0, 5.0, -5.0]))
    meta = BundleMetadata(name="lungclass", version="1", model=cfg,
                          classes=("background", "lung", "infiltrate"),
                          spacing_mm=(8.0, 6.0, 6.0), patch_size=(32, 64, 64))
    save_bundle(tmp_path / "l.safetensors", model, meta)
    res = InferenceEngine(tmp_path / "l.safetensors", device="cpu").run(sorted(chest_ct_dir.glob("*.dcm")))
    assert res.lung_source == "model"
    assert res.measurements.both.infiltrate_ml == 0.0
    right_cols = np.nonzero(res.lung_labels[15] == LUNG_RIGHT)[1].mean()
    left_cols = np.nonzero(res.lung_labels[15] == LUNG_LEFT)[1].mean()
    assert right_cols < left_cols


def test_infer_folder_and_errors(tiny_bundle: Path, chest_ct_dir: Path, shared_data: Path,
                                 tmp_path: Path) -> None:
    engine = InferenceEngine(tiny_bundle, device="cpu")
    shutil.copytree(chest_ct_dir, tmp_path / "in")
    (tmp_path / "in" / "1-12.dcm").unlink()
    with pytest.raises(GeometryError, match="missing slice"):
        infer_folder(tmp_path / "in", engine)
    shutil.copytree(shared_data / "ct" / "ct-2-slices", tmp_path / "in" / "x")
    with pytest.raises(SeriesError, match="pick one"):
        infer_folder(tmp_path / "in", engine)


def test_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        InferenceEngine(tmp_path / "nope.safetensors")
    assert default_bundle_path().name == "lungnode-ct.safetensors"
    assert default_bundle_path().parent.name == "models"


def test_options_from_config_values() -> None:
    opts = EngineOptions.from_settings(overlap=0.5, mirror_tta=True, threads=0, min_component_ml=0.2,
                                       allow_resample=True)
    assert opts.tta_axes == (2,) and opts.threads is None and opts.overlap == 0.5
    assert opts.geometry.allow_irregular_spacing and opts.min_component_ml == 0.2
    assert EngineOptions.from_settings().tta_axes == ()


def test_irregular_series_accepted_explicitly(tiny_bundle: Path, chest_copy: Path) -> None:
    ds = pydicom.dcmread(chest_copy / "1-10.dcm")
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 3.0]
    ds.save_as(chest_copy / "1-10.dcm")
    files = sorted(chest_copy.glob("*.dcm"))
    with pytest.raises(GeometryError, match="irregular"):
        InferenceEngine(tiny_bundle, device="cpu").run(files)
    opts = EngineOptions.from_settings(allow_resample=True)
    engine = InferenceEngine(tiny_bundle, device="cpu", options=opts)
    res = engine.run(files)
    v = res.volume
    per_slice_ml = v.slice_thickness_weights() * v.spacing_mm[1] * v.spacing_mm[2] / 1000
    counts = (res.lung_labels > 0).sum(axis=(1, 2))
    assert res.measurements.both.lung_ml == pytest.approx(float(counts @ per_slice_ml))
    assert not np.allclose(per_slice_ml, per_slice_ml[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu(tiny_bundle: Path, chest_ct_dir: Path) -> None:
    files = sorted(chest_ct_dir.glob("*.dcm"))
    cpu = InferenceEngine(tiny_bundle, device="cpu").run(files)
    gpu = InferenceEngine(tiny_bundle, device="cuda").run(files)
    assert np.array_equal(cpu.lung_labels, gpu.lung_labels)
    a, b = cpu.infiltrate, gpu.infiltrate
    assert 2 * np.count_nonzero(a & b) >= 0.9 * (a.sum() + b.sum())  # bf16 autocast vs float32
