"""Checkpoint bundles: round trip, fp16 storage, corrupt and mismatched files refused."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lungnode.inference.checkpoint import BundleError, BundleMetadata, load_bundle, save_bundle
from lungnode.inference.model import ModelConfig, build_model

TINY = ModelConfig(encoder="r3d_18", encoder_depth=2, in_channels=3, num_classes=2, final_channels=8)


@pytest.fixture
def make_bundle(bundle_factory):  # type: ignore[no-untyped-def]
    return bundle_factory



def _header(path: Path) -> tuple[int, dict[str, Any]]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    meta = BundleMetadata(name="m", version="1.2", model=TINY, weights_dtype=dtype,
                          metrics={"dice": 0.8}, training_data={"mosmed": 50})
    written = save_bundle(tmp_path / "m.safetensors", model, meta)
    loaded, got = load_bundle(tmp_path / "m.safetensors")
    assert got == written and got.metrics == {"dice": 0.8} and len(got.weights_sha256) == 64
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 1, 4, 16, 16) * 300
    with torch.inference_mode():
        a, b = model(x), loaded(x)
    assert torch.allclose(a, b, atol=1e-5 if dtype == "float32" else 5e-2)


def test_fp16_halves_the_file(tmp_path: Path, make_bundle) -> None:  # type: ignore[no-untyped-def]
    a = make_bundle(tmp_path / "a.safetensors", weights_dtype="float32")
    b = make_bundle(tmp_path / "b.safetensors", weights_dtype="float16")
    assert b.stat().st_size < 0.6 * a.stat().st_size


def test_corrupt_weights_refused(tmp_path: Path, make_bundle) -> None:  # type: ignore[no-untyped-def]
    path = make_bundle(tmp_path / "c.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(path)


def test_truncated_and_foreign_files_refused(tmp_path: Path, make_bundle) -> None:  # type: ignore[no-untyped-def]
    path = make_bundle(tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match="readable"):
        load_bundle(path)
    save_file({"x": torch.zeros(3)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(BundleError, match="not a lungnode bundle"):
        load_bundle(tmp_path / "f.safetensors")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "absent.safetensors")


def _rewrite_metadata(path: Path, change: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    _, header = _header(path)
    meta = json.loads(header["__metadata__"]["lungnode"])
    meta.update(change)
    save_file(tensors, str(path), metadata={"lungnode": json.dumps(meta)})


def test_mismatched_architecture_refused(tmp_path: Path, make_bundle) -> None:  # type: ignore[no-untyped-def]
    path = make_bundle(tmp_path / "m.safetensors")
    _rewrite_metadata(path, {"model": {**TINY.to_dict(), "encoder_depth": 3}})
    with pytest.raises(BundleError, match="architecture"):
        load_bundle(path)
    path = make_bundle(tmp_path / "v.safetensors")
    _rewrite_metadata(path, {"format_version": 99})
    with pytest.raises(BundleError, match="version"):
        load_bundle(path)
    path = make_bundle(tmp_path / "k.safetensors")
    _rewrite_metadata(path, {"classes": ["background", "lung"]})
    with pytest.raises(BundleError, match="infiltrate"):
        load_bundle(path)


def test_save_refuses_inconsistent_metadata(tmp_path: Path) -> None:
    model = build_model(TINY)
    meta = BundleMetadata(name="m", version="1", model=replace(TINY, num_classes=3))
    with pytest.raises(BundleError):
        save_bundle(tmp_path / "x.safetensors", model, meta)
    with pytest.raises(BundleError, match="classes"):
        save_bundle(tmp_path / "x.safetensors", build_model(ModelConfig(num_classes=3, encoder_depth=2)),
                    BundleMetadata(name="m", version="1", model=ModelConfig(num_classes=3, encoder_depth=2)))
