"""The bundled demo model: small fp16 file, honest metadata, and it segments a held-out phantom on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lungnode.inference.checkpoint import load_bundle
from lungnode.training.cases import phantom_cases
from lungnode.training.evaluate import predict_masks
from lungnode.training.lesions import build_lesion_bank
from lungnode.training.metrics import dice_score
from lungnode.training.phantom import PhantomOptions

BUNDLE = Path(__file__).resolve().parents[2] / "lungnode" / "models" / "lungnode-demo.safetensors"


def test_bundle_file_and_metadata() -> None:
    assert BUNDLE.is_file(), "the demo bundle is part of the package"
    assert BUNDLE.stat().st_size < 40 * 2**20
    _, meta = load_bundle(BUNDLE)
    assert meta.name == "lungnode-demo" and meta.weights_dtype == "float16"
    assert meta.model.encoder_depth < 4  # truncated encoder
    assert meta.classes == ("lung", "infiltrate") and meta.activation == "sigmoid"
    held = meta.metrics["heldout_phantoms"]
    assert held["cases"] >= 20 and 0.0 < held["dice_infiltrate_mean"] <= 1.0
    assert "not clinically validated" in meta.notes.lower()
    card = json.loads(BUNDLE.with_suffix(".json").read_text())
    assert card["sha256"] == hashlib.sha256(BUNDLE.read_bytes()).hexdigest()
    assert card["metrics"] == meta.metrics and "not clinically validated" in card["status"].lower()


def test_bundle_segments_a_held_out_phantom_on_cpu(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "masks" / "mosmed"
    held = [src / f"study_{n:04d}_mask.nii.gz" for n in range(295, 305)]  # never used in training
    if not all(f.is_file() for f in held):
        pytest.skip("held-out MosMed masks not found")
    d = tmp_path / "masks"
    d.mkdir()
    for f in held:
        (d / f.name).write_bytes(f.read_bytes())
    bank = build_lesion_bank(d)
    opts = PhantomOptions(shape=(32, 128, 128), spacing_mm=(2.5, 2.5, 2.5), empty_fraction=0.0,
                          max_lesions=8)
    case = phantom_cases(1, bank, opts, seed0=424242, workers=1)[0]
    assert case.lung is not None and case.infiltrate.sum() > 200
    model, meta = load_bundle(BUNDLE)
    pred = predict_masks(model, meta, case.hu.astype(np.float32), case.spacing_mm, "cpu")
    assert dice_score(pred["lung"], case.lung) > 0.9
    assert dice_score(pred["infiltrate"], case.infiltrate) > 0.5
