"""The bundled model lungnode-ct: small fp16 file, honest metadata and card, and it runs on CPU.

Figures of the model (Dice, false-positive rates) are measured by ``bench/model_real.py`` and
reported in docs/training.md, not asserted here; this only checks that the shipped file is what
its card says and that the node's engine produces anatomically sane output with it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lungnode.inference.checkpoint import load_bundle
from lungnode.inference.engine import InferenceEngine, default_bundle_path

BUNDLE = Path(__file__).resolve().parents[2] / "lungnode" / "models" / "lungnode-ct.safetensors"


def test_bundle_file_and_metadata() -> None:
    assert BUNDLE.is_file(), "the bundled model is part of the package"
    assert default_bundle_path() == BUNDLE
    assert not BUNDLE.with_name("lungnode-demo.safetensors").exists(), "the demo bundle is gone"
    assert BUNDLE.stat().st_size < 30 * 2**20
    _, meta = load_bundle(BUNDLE)
    assert meta.name == "lungnode-ct" and meta.version == "0.3.0"
    assert meta.weights_dtype == "float16" and meta.model.encoder_depth < 4
    assert meta.classes == ("lung", "infiltrate") and meta.activation == "sigmoid"
    assert meta.training_data["source"] == "real"
    assert "not clinically validated" in meta.notes.lower()
    card = json.loads(BUNDLE.with_suffix(".json").read_text())
    assert card["sha256"] == hashlib.sha256(BUNDLE.read_bytes()).hexdigest()
    assert card["name"] == meta.name and card["version"] == meta.version
    assert "not clinically validated" in card["status"].lower()


def test_bundle_runs_on_the_real_chest_ct_on_cpu(chest_ct_dir: Path) -> None:
    engine = InferenceEngine(None, "cpu")
    res = engine.run(sorted(chest_ct_dir.glob("*.dcm")))
    m = res.measurements
    assert res.lung_source == "model"
    assert 200 < m.both.lung_ml < 12000
    assert m.right.lung_ml > 0 and m.left.lung_ml > 0
    assert not (res.infiltrate & (res.lung_labels == 0)).any(), "infiltrate only inside the lungs"
