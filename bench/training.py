"""Training-speed benchmark: seconds per epoch of the reference setting (Bressem et al. 2021).

The paper's epoch: 100 volumes at 20x256x256, batch 1, full R3D-18 U-Net, on an RTX 2080 Ti took
about 2 min 30 s (150 s). This script times the same epoch with the project's trainer (phantom
volumes resident on the device, augmentation in one ``grid_sample``, bf16 autocast and
``channels_last_3d`` on CUDA) and prints a markdown table; ``--json`` also writes the numbers.

Usage::

    python bench/training.py                 # GPU when present: paper setting, AMP and fp32/tf32
    python bench/training.py --cpu-small     # small CPU setting (4 volumes at 16x64x64, depth 2)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lungnode.training.cases import default_lesion_bank, phantom_cases
from lungnode.training.phantom import PhantomOptions
from lungnode.training.recipe import load_recipe
from lungnode.training.trainer import train

PAPER_EPOCH_S = 150.0


def run_setting(label: str, n: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                overrides: dict[str, Any], epochs: int, device: str, workdir: Path) -> dict[str, Any]:
    """Time ``epochs`` epochs of one setting; the first epoch is warm-up and not counted."""
    bank = default_lesion_bank()
    t0 = time.perf_counter()
    cases = phantom_cases(n, bank, PhantomOptions(shape=shape, spacing_mm=spacing), 0, "bench", "bench")
    gen_s = time.perf_counter() - t0
    recipe = load_recipe("reference", {"data.source": "phantom", "train.pretrained": "", **overrides})
    res = train(recipe, workdir / label, cases, [], device=device, progress=False, max_epochs=epochs,
                log=lambda s: None)
    secs = res.train_seconds_per_epoch
    timed = secs[1:] if len(secs) > 1 else secs
    med = statistics.median(timed)
    return {"setting": label, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "volumes": n, "patch": list(recipe.stages[0].patch), "batch": recipe.stages[0].batch,
            "encoder_depth": recipe.model.encoder_depth, "amp": recipe.train.amp,
            "seconds_per_epoch": round(med, 3), "epochs_timed": len(timed), "all_epochs_s": secs,
            "speedup_vs_paper": round(PAPER_EPOCH_S / med, 1) if n == 100 else None,
            "phantom_generation_s": round(gen_s, 1), "final_loss": res.history[-1]["train_loss"]}


def main() -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-small", action="store_true", help="only the small CPU setting")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per setting (first is warm-up)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--workdir", default="/tmp/lungnode-bench")
    ap.add_argument("--bf16-only", action="store_true", help="skip the fp32/tf32 comparison on GPU")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    stage256 = {"stages": [{"name": "unfrozen-256", "mode": "resize", "epochs": 1000, "batch": 1,
                            "patch": [20, 256, 256], "lr": 1e-3, "weight_decay": 1e-5}]}
    if torch.cuda.is_available() and not args.cpu_small:
        for amp in (True,) if args.bf16_only else (True, False):
            rows.append(run_setting(f"paper-20x256x256-{'bf16' if amp else 'tf32'}", 100, (40, 256, 256),
                                    (5.0, 1.4, 1.4), {**stage256, "train.amp": amp}, args.epochs, "cuda",
                                    work))
    small = {"stages": [{"name": "small", "mode": "resize", "epochs": 1000, "batch": 1,
                         "patch": [8, 64, 64], "lr": 1e-3}], "model.encoder_depth": 2,
             "model.final_channels": 8}
    rows.append(run_setting("cpu-small-4x8x64x64-depth2", 4, (16, 64, 64), (5.0, 5.0, 5.0), small,
                            args.epochs, "cpu", work))
    print("| setting | device | volumes | patch | batch | depth | s/epoch | vs paper (150 s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{r['speedup_vs_paper']}x" if r["speedup_vs_paper"] else "–"
        print(f"| {r['setting']} | {r['device']} | {r['volumes']} | {'x'.join(map(str, r['patch']))} | "
              f"{r['batch']} | {r['encoder_depth']} | {r['seconds_per_epoch']:.2f} | {sp} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
