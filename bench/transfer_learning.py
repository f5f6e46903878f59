"""Transfer-learning evidence: pretrained vs scratch encoder, frozen vs fine-tuned, same budget.

Pretrains the encoder on the phantom pretext tasks (``training pretrain``: Med3D-style shared encoder,
several heads, no infiltrate target), then trains the infiltrate model four ways with identical
data, steps and seeds, validating on held-out phantoms after every epoch:

* ``scratch``            random encoder, everything trained;
* ``pretrained-finetune`` pretrained encoder, everything trained;
* ``pretrained-frozen``   pretrained encoder kept frozen, decoder trained;
* ``pretrained-frozen-then-finetune``: half the epochs frozen, then everything (the paper's schedule).

Writes ``transfer.csv`` (epoch, arm, val Dice) and ``transfer.png`` (curves) to ``--out``.

Usage::

    python bench/transfer_learning.py --out runs/transfer            # GPU, a few minutes
    python bench/transfer_learning.py --out /tmp/t --tiny            # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from lungnode.training.phantom import PhantomOptions
from lungnode.training.pretrain import pretrain_encoder
from lungnode.training.recipe import load_recipe
from lungnode.training.sources import recipe_cases
from lungnode.training.trainer import train


def main() -> int:
    """Run the four arms and plot their validation curves."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke settings")
    args = ap.parse_args()
    out = Path(args.out)
    epochs = 2 if args.tiny else args.epochs
    base: dict[str, Any] = {"data.phantom_train": 48, "data.phantom_val": 8, "train.val_every": 1}
    popts = None
    if args.tiny:
        base.update({"data.phantom_train": 2, "data.phantom_val": 1, "data.phantom_shape": [24, 64, 64],
                     "data.spacing_mm": [6.0, 5.0, 5.0], "model.encoder_depth": 2, "model.final_channels": 8})
        popts = PhantomOptions(shape=(24, 64, 64), spacing_mm=(6.0, 5.0, 5.0))
    depth = int(base.get("model.encoder_depth", 3))
    enc = pretrain_encoder(out / "pretrain", steps=2 if args.tiny else args.pretrain_steps, depth=depth,
                           n_phantoms=2 if args.tiny else 32, phantom_options=popts,
                           patch=(8, 32, 32) if args.tiny else (32, 96, 96))
    patch = [8, 32, 32] if args.tiny else [32, 128, 128]
    iters = 2 if args.tiny else 40

    def stage(name: str, n: int, frozen: bool) -> dict[str, Any]:
        return {"name": name, "mode": "patch", "epochs": n, "batch": 2, "patch": patch, "lr": 2e-3,
                "freeze_encoder": frozen, "iters_per_epoch": iters}

    half = epochs // 2
    arms = {
        "scratch": ({"stages": [stage("all", epochs, False)]}, ""),
        "pretrained-finetune": ({"stages": [stage("all", epochs, False)]}, str(enc)),
        "pretrained-frozen": ({"stages": [stage("frozen", epochs, True)]}, str(enc)),
        "pretrained-frozen-then-finetune": (
            {"stages": [stage("frozen", half, True), stage("finetune", epochs - half, False)]}, str(enc)),
    }
    recipe0 = load_recipe("demo", base)
    train_cases, val_cases = recipe_cases(recipe0, log=lambda s: None)
    rows = []
    for arm, (over, pre) in arms.items():
        recipe = load_recipe("demo", {**base, **over, "train.pretrained": pre})
        res = train(recipe, out / arm, train_cases, val_cases, progress=False, log=lambda s: None)
        for r in res.history:
            rows.append({"arm": arm, "epoch": r["epoch"], "dice_infiltrate": r.get("dice_infiltrate", ""),
                         "dice_lung": r.get("dice_lung", ""), "train_loss": r["train_loss"]})
        print(f"{arm}: best infiltrate Dice {res.best_metric:.4f} (epoch {res.best_epoch})", flush=True)
    with open(out / "transfer.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for arm in arms:
            pts = [(r["epoch"], r["dice_infiltrate"]) for r in rows
                   if r["arm"] == arm and r["dice_infiltrate"] != ""]
            ax.plot(*zip(*pts, strict=True), marker=".", label=arm)
        ax.set_xlabel("epoch (same steps per arm)")
        ax.set_ylabel("validation infiltrate Dice (held-out phantoms)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "transfer.png", dpi=90)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
