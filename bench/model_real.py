"""Figures of a model bundle on real CT, through the node's own inference path.

Usage::

    python -m bench.model_real --bundle lungnode/models/lungnode-ct.safetensors \\
        --out docs/training/eval --painted 3

For every evaluation patient of :data:`lungnode.training.realcases.HOSTS` (never used in training)
and the whole-body CT:

* **unmodified** series: :class:`~lungnode.inference.engine.InferenceEngine` ``run`` on the DICOM
  files (exactly what ``lungnode infer`` and the node run): lung volume, infiltrate mL and % of
  the lung, infiltrate predicted outside the lungs, the default quality gate
  (:func:`lungnode.node.dispatch.quality.check_quality` with ``QualityGateConfig()``), lung or infiltrate
  below the lung base (most caudal slice of the threshold lungs, 10 mm margin);
* **painted** (``--painted N`` per patient): real MosMed lesion shapes of the *held-out* studies
  (0295-0304) painted on the source grid (:mod:`lungnode.training.painting`), then ``run_volume``:
  infiltrate Dice and normalised surface Dice (3 mm, MONAI sub-voxel) per case.

Writes ``results.csv``, ``summary.md`` and one montage PNG per case (lung outlines red/blue, truth
green, prediction magenta).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from lungnode.config import QualityGateConfig
from lungnode.inference.dicom_io import find_series_files, read_series
from lungnode.inference.engine import InferenceEngine
from lungnode.inference.lungmask import superior_sign, threshold_lungs
from lungnode.inference.types import InferenceResult, SeriesVolume
from lungnode.node.dispatch.quality import check_quality
from lungnode.training.cases import default_lesion_bank
from lungnode.training.metrics import dice_score, summarize, surface_dice
from lungnode.training.montage import save_montage
from lungnode.training.painting import paint_lesions
from lungnode.training.realcases import HOSTS, Host, default_real_root


def _ml(vol: SeriesVolume, mask: np.ndarray) -> float:
    w = vol.slice_thickness_weights() * vol.spacing_mm[1] * vol.spacing_mm[2] / 1000.0
    return float(mask.sum(axis=(1, 2)) @ w)


def _below_base(vol: SeriesVolume, reference: np.ndarray, mask: np.ndarray) -> float:
    sup = superior_sign(vol)
    zs = np.nonzero(reference.any(axis=(1, 2)))[0]
    if sup == 0 or zs.size == 0:
        return float("nan")
    height = vol.slice_positions() * sup
    below = height < height[zs].min() - 10.0
    return _ml(vol, mask & below[:, None, None])


def _box(mask: np.ndarray, pad: int = 4) -> tuple[slice, ...]:
    """Bounding box of a mask (whole array when empty), padded."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    out = []
    for ax in range(3):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0]
        out.append(slice(max(0, idx.min() - pad), min(mask.shape[ax], idx.max() + pad + 1)))
    return tuple(out)


def _row(name: str, kind: str, res: InferenceResult, ref: np.ndarray) -> dict[str, Any]:
    m = res.measurements
    gate = check_quality(m, QualityGateConfig())
    lung = res.lung_labels > 0
    return {
        "case": name, "kind": kind, "lung_ml": round(m.both.lung_ml, 1),
        "right_ml": round(_ml(res.volume, res.lung_labels == 1), 1),
        "left_ml": round(_ml(res.volume, res.lung_labels == 2), 1),
        "infiltrate_ml": round(m.both.infiltrate_ml, 1),
        "infiltrate_pct": round(100.0 * m.both.infiltrate_ml / max(m.both.lung_ml, 1e-6), 2),
        "outside_ml": round(m.infiltrate_outside_lung_ml, 1),
        "gate": "pass" if gate.passed else f"held: {gate.reason}",
        "lung_below_base_ml": round(_below_base(res.volume, ref, lung), 1),
        "infiltrate_below_base_ml": round(_below_base(res.volume, ref, res.infiltrate), 1),
        "lung_source": res.lung_source,
        "seconds": round(sum(res.seconds.values()), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--painted", type=int, default=3, help="painted variants per evaluation patient")
    ap.add_argument("--root", type=Path, default=default_real_root())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="folder names to run (default: all)")
    ap.add_argument("--no-paint", nargs="*", default=(), help="folder names run unmodified only")
    args = ap.parse_args()
    from lungnode.inference.engine import EngineOptions

    engine = InferenceEngine(args.bundle, "cpu", EngineOptions(threads=args.threads))
    _, held_bank = default_lesion_bank().split(0.2)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    hosts: list[Host] = [h for h in HOSTS if h.split == "eval"]
    hosts.append(Host("real-chest/tcga-thca-de-a4ma-wholebody", "TCGA-DE-A4MA", "train"))
    for hi, h in enumerate(hosts):
        folder = args.root / h.folder
        name = folder.name
        if args.only and name not in args.only:
            continue
        files = find_series_files(folder)
        t = time.perf_counter()
        res = engine.run(files)
        ref = threshold_lungs(res.volume).labels > 0
        row = _row(name, "unmodified" if h.split == "eval" else "unmodified (training patient)",
                   res, ref)
        rows.append(row)
        print(row, f"{time.perf_counter() - t:.0f} s", flush=True)
        vol = res.volume
        aspect = vol.spacing_mm[1] / vol.spacing_mm[2]
        save_montage(args.out / f"{name}-unmodified.png", vol.hu, res.lung_labels, None,
                     res.infiltrate, title=f"{name} unmodified: infiltrate {row['infiltrate_pct']} % "
                     f"of {row['lung_ml']:.0f} mL lung, gate {row['gate']}", aspect=aspect)
        if h.split != "eval" or args.painted <= 0 or name in args.no_paint:
            continue
        labels = threshold_lungs(vol).labels
        sup = superior_sign(vol)
        ny = vol.direction[1][1]
        src = read_series(files, engine.options.geometry, False)
        hu16 = np.clip(np.rint(src.hu), -1024, 3071).astype(np.int16)
        del src
        for i in range(args.painted):
            seed = 900_000 + 1000 * hi + i
            p = paint_lesions(hu16, labels, vol.spacing_mm, held_bank, np.random.default_rng(seed),
                              sup, float(np.sign(ny)) if abs(ny) >= 0.5 else 0.0)
            pv = dataclasses.replace(vol, hu=p.hu.astype(np.float32))
            pres = engine.run_volume(pv)
            prow = _row(f"{name}-painted{seed}", "painted", pres, ref)
            prow["truth_ml"] = round(_ml(vol, p.infiltrate), 1)
            prow["kinds"] = "+".join(sorted(set(p.kinds)))
            prow["dice_infiltrate"] = round(dice_score(pres.infiltrate, p.infiltrate), 4)
            box = _box(pres.infiltrate | p.infiltrate)
            prow["nsd3_infiltrate"] = round(surface_dice(pres.infiltrate[box], p.infiltrate[box],
                                                         vol.spacing_mm, 3.0), 4)
            rows.append(prow)
            print(prow, flush=True)
            save_montage(args.out / f"{name}-painted{seed}.png", p.hu, pres.lung_labels, p.infiltrate,
                         pres.infiltrate, title=f"{name} painted ({prow['kinds']}): Dice "
                         f"{prow['dice_infiltrate']}, NSD {prow['nsd3_infiltrate']}", aspect=aspect)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    painted = [r for r in rows if r["kind"] == "painted"]
    lines = [f"# {engine.model_info.name} {engine.model_info.version} on real CT", ""]
    if painted:
        d_m, d_s = summarize([r["dice_infiltrate"] for r in painted])
        n_m, n_s = summarize([r["nsd3_infiltrate"] for r in painted])
        lines += [f"Painted held-out patients ({len(painted)} cases): infiltrate Dice "
                  f"{d_m:.3f} ± {d_s:.3f}, NSD(3 mm) {n_m:.3f} ± {n_s:.3f}", ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
