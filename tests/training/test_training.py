"""Training loop on tiny phantoms: the loss falls; logs, checkpoints, resume; recipes; export → node."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from lungnode.inference.checkpoint import load_bundle
from lungnode.training.cases import Case
from lungnode.training.recipe import RecipeError, load_recipe
from lungnode.training.trainer import make_targets, train

TINY_OVERRIDES = {
    "model.encoder_depth": 2, "model.final_channels": 8,
    "stages": [{"name": "frozen", "mode": "patch", "epochs": 1, "batch": 2, "patch": [8, 32, 32], "lr": 3e-3,
                "freeze_encoder": True, "iters_per_epoch": 2},
               {"name": "tune", "mode": "patch", "epochs": 3, "batch": 2, "patch": [8, 32, 32], "lr": 3e-3,
                "iters_per_epoch": 4, "lesion_focus": 0.7}],
    "train.val_every": 2, "export.patch_size": [16, 64, 64], "export.fp16": True,
}


def test_shipped_recipes_load_and_bad_keys_are_refused() -> None:
    ref = load_recipe("reference")
    assert [s.patch for s in ref.stages] == [(18, 112, 112), (18, 112, 112), (20, 256, 256)]
    assert ref.stages[0].freeze_encoder and ref.stages[0].lr == 1e-2 and ref.stages[2].batch == 1
    assert ref.model.hu_min == -2000 and ref.model.hu_max == 500 and ref.model.in_channels == 3
    assert load_recipe("native").stages[1].mode == "patch"
    demo = load_recipe("demo")
    assert demo.export.fp16 and demo.model.encoder_depth == 3
    with pytest.raises(RecipeError):
        load_recipe("demo", {"stages.0.bogus": 1})
    with pytest.raises(RecipeError):
        load_recipe("demo", {"labels.classes": ["lung", "tumour"]})


def test_targets_sigmoid_and_softmax() -> None:
    m = torch.zeros(1, 2, 1, 1, 3)
    m[0, 0, 0, 0, 1] = 1  # lung
    m[0, 1, 0, 0, 2] = 1  # infiltrate (inside lung by definition)
    sig = make_targets(m, ("lung", "infiltrate"), "sigmoid")
    assert sig[0, :, 0, 0].tolist() == [[0, 1, 1], [0, 0, 1]]
    soft = make_targets(m, ("background", "lung", "infiltrate"), "softmax")
    assert soft[0, 0, 0, 0].tolist() == [0, 1, 2]


def test_few_iterations_lower_the_loss_and_resume(tiny_cases: list[Case], tmp_path: Path) -> None:
    recipe = load_recipe("demo", TINY_OVERRIDES)
    torch.manual_seed(0)
    out = tmp_path / "run"
    res = train(recipe, out, tiny_cases[:2], tiny_cases[2:], device="cpu", progress=False,
                log=lambda s: None, max_epochs=3)
    assert len(res.history) == 3
    res = train(recipe, out, tiny_cases[:2], tiny_cases[2:], device="cpu", progress=False,
                log=lambda s: None, resume=True)
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # resumed at epoch 4, nothing repeated
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    assert rows[-1]["dice_infiltrate"] != ""  # validated on the last epoch
    for f in ("last.pt", "best.pt", "curves.png"):
        assert (out / f).is_file()


def test_export_then_node_loads_and_infers(tiny_cases: list[Case], tmp_path: Path) -> None:
    from lungnode.inference.engine import InferenceEngine
    from lungnode.inference.types import SeriesVolume
    from lungnode.training.export import export_bundle

    recipe = load_recipe("demo", {**TINY_OVERRIDES, "data.spacing_mm": [6.0, 5.0, 5.0]})
    out = tmp_path / "run"
    train(recipe, out, tiny_cases[:1], [], device="cpu", progress=False, log=lambda s: None, max_epochs=1)
    bundle = tmp_path / "m.safetensors"
    meta = export_bundle(recipe, out / "best.pt", bundle, metrics={"note": "test"})
    assert meta.weights_dtype == "float16" and meta.metrics == {"note": "test"}
    _model, back = load_bundle(bundle)
    assert back.classes == ("lung", "infiltrate") and back.model.encoder_depth == 2
    c = tiny_cases[2]
    vol = SeriesVolume(hu=c.hu.astype(np.float32), spacing_mm=c.spacing_mm, origin_mm=(0.0, 0.0, 0.0),
                       direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                       source_files=tuple(Path(f"{i}.dcm") for i in range(c.hu.shape[0])),
                       source_frames=(1,) * c.hu.shape[0],
                       sop_instance_uids=tuple(f"1.2.3.{i}" for i in range(c.hu.shape[0])))
    result = InferenceEngine(bundle, device="cpu").run_volume(vol)
    assert result.infiltrate.shape == c.hu.shape and result.lung_labels.shape == c.hu.shape
    assert result.model.name == recipe.export.name


def test_pretrained_encoder_transfers_through_the_kinetics_loader(bank: object, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lungnode.inference.model import ModelConfig, build_model, load_encoder_weights
    from lungnode.training import pretrain
    from tests.training.conftest import TINY

    monkeypatch.setattr(pretrain, "default_lesion_bank", lambda spec="": bank)
    path = pretrain.pretrain_encoder(tmp_path, steps=2, depth=2, device="cpu", n_phantoms=2,
                                     patch=(8, 32, 32), batch=1, phantom_options=TINY, log_every=1)
    rows = (tmp_path / "pretrain.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,loss,loss_lung")
    model = build_model(ModelConfig(encoder_depth=2, final_channels=8))
    unused = load_encoder_weights(model, path, "kinetics")
    assert unused == []
    saved = torch.load(path, weights_only=True)
    assert torch.equal(model.encoder.state_dict()["stem.0.weight"], saved["stem.0.weight"])
