"""The training loop: stages (frozen/unfrozen encoder, progressive resizing), one-cycle LR, Dice +
cross-entropy, device-side augmentation, AMP, optional torch.compile and DDP, checkpoints, logs.

This module owns running a :class:`~lungnode.training.recipe.Recipe` to completion:

* all cases stay resident on the training device; each sample is one ``grid_sample`` (crop +
  spatial augmentation, :mod:`.augment`), so no data-loader workers are needed;
* per stage: encoder frozen or not (frozen BatchNorm statistics too), AdamW, ``OneCycleLR`` over
  the stage's steps; loss MONAI ``DiceCELoss`` (sigmoid or softmax);
* validation after every ``val_every`` epochs with the node's own sliding-window inference
  (``mode="patch"``) or at the stage's resized resolution (``mode="resize"``), per-case Dice per
  class, macro-averaged;
* run folder: ``metrics.csv``, ``curves.png``, ``last.pt`` (resumable), ``best.pt`` (best
  validation ``best_metric``), ``recipe.toml`` copy;
* several GPUs: launch with ``torchrun --nproc_per_node N -m lungnode.training train ...``
  (``WORLD_SIZE``/``LOCAL_RANK`` set): DistributedDataParallel, rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungnode.inference.model import UNet3D, build_model, load_encoder_weights
from lungnode.training.augment import sample_patch
from lungnode.training.cases import Case
from lungnode.training.metrics import dice_score
from lungnode.training.recipe import Recipe, StageSpec

__all__ = ["ResidentCase", "TrainResult", "init_from_bundle", "make_targets", "predict_case", "train"]


@dataclass
class ResidentCase:
    """A case on the training device: HU, masks ``[lung, infiltrate]`` and lesion voxel list."""

    case: Case
    hu: torch.Tensor
    masks: torch.Tensor
    lesion_vox: np.ndarray


@dataclass
class TrainResult:
    """What a finished run produced."""

    out_dir: Path
    best_metric: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds_per_epoch: list[float] = field(default_factory=list)


def _lung_or_zero(c: Case) -> np.ndarray:
    return c.lung if c.lung is not None else np.zeros_like(c.infiltrate)


def _resident(cases: list[Case], device: torch.device) -> list[ResidentCase]:
    out = []
    for c in cases:
        masks = np.stack([_lung_or_zero(c), c.infiltrate]).astype(np.uint8)
        vox = np.argwhere(c.infiltrate)
        if len(vox) > 20000:
            vox = vox[np.random.default_rng(0).choice(len(vox), 20000, replace=False)]
        out.append(ResidentCase(c, torch.from_numpy(c.hu).to(device), torch.from_numpy(masks).to(device),
                                vox))
    return out


def make_targets(masks: torch.Tensor, classes: tuple[str, ...], activation: str) -> torch.Tensor:
    """Loss targets from ``[lung, infiltrate]`` masks ``(B, 2, ...)``.

    Sigmoid: one channel per class (``lung`` includes infiltrate). Softmax: label map
    ``(B, 1, ...)`` with the class index (``lung`` = lung without infiltrate).
    """
    lung = torch.maximum(masks[:, 0:1], masks[:, 1:2])
    inf = masks[:, 1:2]
    if activation == "sigmoid":
        chans = {"lung": lung, "infiltrate": inf, "background": 1 - lung}
        return torch.cat([chans[c] for c in classes], dim=1)
    label = torch.zeros_like(inf)
    if "lung" in classes:
        label[lung > 0] = float(classes.index("lung"))
    label[inf > 0] = float(classes.index("infiltrate"))
    return label


def _probs_to_masks(probs: torch.Tensor, classes: tuple[str, ...], activation: str,
                    threshold: float = 0.5) -> dict[str, np.ndarray]:
    """``lung`` and ``infiltrate`` masks from ``(C, D, H, W)`` probabilities."""
    if activation == "sigmoid":
        out = {c: (probs[i] > threshold).numpy() for i, c in enumerate(classes)}
    else:
        arg = probs.argmax(0)
        out = {c: (arg == i).numpy() for i, c in enumerate(classes)}
        if "lung" in out:
            out["lung"] = out["lung"] | out["infiltrate"]
    return out


def predict_case(model: nn.Module, hu: torch.Tensor, stage: StageSpec, classes: tuple[str, ...],
                 activation: str, device: torch.device, overlap: float = 0.25) -> dict[str, np.ndarray]:
    """Masks for one resident volume the way validation sees it (sliding window or resized)."""
    from lungnode.inference.predict import predict_probabilities, valid_patch_size

    model.eval()
    vol = hu.float()
    if stage.mode == "resize":
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            x = F.interpolate(vol[None, None].to(device), size=stage.patch, mode="trilinear",
                              align_corners=True)
            logits = model(x).float()
            logits = F.interpolate(logits, size=vol.shape, mode="trilinear", align_corners=True)[0]
        probs = torch.softmax(logits, 0) if activation == "softmax" else torch.sigmoid(logits)
        return _probs_to_masks(probs.cpu(), classes, activation)
    divisor = getattr(model, "divisor", (8, 16, 16))
    patch = valid_patch_size(stage.patch, vol.shape, divisor)
    probs = predict_probabilities(model, vol.cpu(), patch, overlap=overlap, activation=activation,
                                  device=device)
    return _probs_to_masks(probs.float().cpu(), classes, activation)


def init_from_bundle(model: UNet3D, bundle: Path | str) -> int:
    """Copy every tensor of a bundle whose name and shape match into ``model``.

    Parameters
    ----------
    model:
        Freshly built network.
    bundle:
        A lungnode bundle (e.g. the phantom-trained demo model).

    Returns
    -------
    int
        Tensors copied.
    """
    from lungnode.inference.checkpoint import load_bundle

    src, _ = load_bundle(bundle)
    theirs = src.state_dict()
    mine = model.state_dict()
    same = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    mine.update(same)
    model.load_state_dict(mine)
    return len(same)


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, total_steps: int,
              pct_start: float = 0.25) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule; nudges ``pct_start`` off the value that makes torch divide by zero
    (warm-up ending exactly at step 0, which happens for some tiny step counts)."""
    total = max(1, total_steps)
    if abs(pct_start * total - 1.0) < 1e-9:
        pct_start += 0.5 / total
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=pct_start)


def _set_frozen(model: UNet3D, frozen: bool) -> None:
    for p in model.encoder.parameters():
        p.requires_grad = not frozen


def _batch(rc: list[ResidentCase], idx: list[int], stage: StageSpec, recipe: Recipe,
           gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    imgs, msks = [], []
    for i in idx:
        r = rc[i]
        shape = r.hu.shape
        center: tuple[float, float, float] | None = None
        if stage.mode == "patch":
            if len(r.lesion_vox) and float(torch.rand((), generator=gen)) < stage.lesion_focus:
                v = r.lesion_vox[int(torch.randint(len(r.lesion_vox), (), generator=gen))]
                center = (float(v[0]), float(v[1]), float(v[2]))
            else:
                start = [int(torch.randint(max(1, n - p + 1), (), generator=gen)) for n, p in
                         zip(shape, stage.patch, strict=False)]
                center = tuple(s + (p - 1) / 2 for s, p in zip(start, stage.patch, strict=False))  # type: ignore[assignment]
        img, m = sample_patch(r.hu, r.masks, r.case.spacing_mm, stage.patch, center, gen, recipe.augment,
                              whole_volume=stage.mode == "resize")
        imgs.append(img)
        msks.append(m)
    return torch.stack(imgs).to(device), torch.stack(msks).to(device)


def _write_curves(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the [train] extra; the CSV is always written
        return
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [r["train_loss"] for r in rows], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for k in rows[-1]:
        if k.startswith("dice_"):
            pts = [(r["epoch"], r[k]) for r in rows if r.get(k, "") != ""]
            if pts:
                ax[1].plot(*zip(*pts, strict=False), marker=".", label=f"val {k}")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1)
    if ax[1].get_legend_handles_labels()[0]:
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, mininterval=10.0, leave=False,
                    file=sys.stderr)
    except ImportError:
        return None


def train(
    recipe: Recipe,
    out_dir: Path | str,
    train_cases: list[Case],
    val_cases: list[Case],
    device: str | torch.device | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    max_epochs: int | None = None,
) -> TrainResult:
    """Run a recipe.

    Parameters
    ----------
    recipe:
        The run.
    out_dir:
        Run folder (created).
    train_cases, val_cases:
        Cases at the recipe spacing.
    device:
        ``"cuda"``, ``"cpu"``... (default: CUDA when available; under torchrun the local rank).
    resume:
        Continue from ``out_dir/last.pt``.
    log:
        Line printer.
    progress:
        Show progress bars.
    max_epochs:
        Stop after this many epochs in total (for benchmarks and tests).

    Returns
    -------
    TrainResult
    """
    out = Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        dist.init_process_group("nccl")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if recipe.source and Path(recipe.source).is_file():
            shutil.copyfile(recipe.source, out / "recipe.toml")
    torch.manual_seed(recipe.train.seed)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(recipe.model)
    if recipe.train.init_bundle:
        n_init = init_from_bundle(model, recipe.train.init_bundle)
        log(f"initialised {n_init} tensors from {recipe.train.init_bundle}")
    if recipe.train.pretrained:
        unused = load_encoder_weights(model, recipe.train.pretrained, recipe.train.pretrained_kind,
                                      expected_sha256=recipe.train.pretrained_sha256 or None)
        log(f"pretrained encoder from {recipe.train.pretrained} ({len(unused)} unused keys)")
    model.to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    classes, act = recipe.labels.classes, recipe.labels.activation
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(sigmoid=act == "sigmoid", softmax=act == "softmax", to_onehot_y=act == "softmax",
                         lambda_dice=recipe.train.dice_weight, lambda_ce=recipe.train.ce_weight)
    rc_train = _resident(train_cases, dev)
    state: dict[str, Any] = {"stage": 0, "epoch": 0, "best": -1.0, "best_epoch": -1, "rows": []}
    ckpt_last = out / "last.pt"
    resume_state: dict[str, Any] | None = None
    if resume and ckpt_last.is_file():
        resume_state = torch.load(ckpt_last, map_location="cpu", weights_only=False)
        assert resume_state is not None
        model.load_state_dict(resume_state["model"])
        for k in ("stage", "epoch", "best", "best_epoch", "rows"):
            state[k] = resume_state[k]
        log(f"resumed from {ckpt_last}: stage {state['stage']}, epoch {state['epoch']}")
    global_epoch = sum(s.epochs for s in recipe.stages[: state["stage"]]) + state["epoch"]
    epoch_seconds: list[float] = []
    amp = cuda and recipe.train.amp
    t_start = time.perf_counter()
    out_of_time = False
    for si, stage in enumerate(recipe.stages):
        if si < state["stage"] or stage.epochs == 0:
            continue
        _set_frozen(model, stage.freeze_encoder)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        per_rank = math.ceil(len(rc_train) / world)
        iters = stage.iters_per_epoch or max(1, math.ceil(per_rank / stage.batch))
        sched = one_cycle(opt, stage.lr, stage.epochs * iters)
        first_epoch = 0
        if resume_state is not None and si == state["stage"] and state["epoch"] > 0:
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            first_epoch = state["epoch"]
        resume_state = None
        net: nn.Module = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index])
        if recipe.train.compile:
            net = torch.compile(net)  # type: ignore[assignment]
        for epoch in range(first_epoch, stage.epochs):
            if (max_epochs is not None and global_epoch >= max_epochs) or out_of_time:
                break
            model.train()
            if stage.freeze_encoder:
                model.encoder.eval()
            gen = torch.Generator().manual_seed(recipe.train.seed * 100003 + global_epoch * 101 + rank)
            order = torch.randperm(len(rc_train), generator=torch.Generator().manual_seed(
                recipe.train.seed + global_epoch)).tolist()
            mine = order[rank::world] or order
            t0 = time.perf_counter()
            losses = []
            bar = _progress(iters, f"{stage.name} {epoch + 1}/{stage.epochs}", progress and main)
            for it in range(iters):
                idx = [mine[(it * stage.batch + j) % len(mine)] for j in range(stage.batch)]
                x, m = _batch(rc_train, idx, stage, recipe, gen, dev)
                y = make_targets(m, classes, act)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.detach())
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            train_loss = float(torch.stack(losses).mean())
            if cuda:
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            epoch_seconds.append(secs)
            global_epoch += 1
            row: dict[str, Any] = {"stage": stage.name, "epoch": global_epoch, "lr": sched.get_last_lr()[0],
                                   "train_loss": round(train_loss, 5), "train_seconds": round(secs, 3)}
            limit = recipe.train.time_limit_s
            out_of_time = bool(limit) and time.perf_counter() - t_start > limit
            last_of_run = (epoch == stage.epochs - 1 and si == len(recipe.stages) - 1) or out_of_time
            if main and val_cases and (global_epoch % recipe.train.val_every == 0 or last_of_run):
                scores: dict[str, list[float]] = {c: [] for c in ("lung", "infiltrate") if c in classes}
                for c in val_cases:
                    pred = predict_case(model, torch.from_numpy(c.hu), stage, classes, act, dev,
                                        recipe.train.val_overlap)
                    for k in scores:
                        gt = c.infiltrate if k == "infiltrate" else c.lung
                        if gt is not None:
                            scores[k].append(dice_score(pred[k], gt))
                for k, v in scores.items():
                    row[f"dice_{k}"] = round(float(np.mean(v)), 4) if v else ""
                metric = row.get(recipe.train.best_metric, "")
                if metric != "" and float(metric) > state["best"]:
                    state["best"], state["best_epoch"] = float(metric), global_epoch
                    torch.save({"model": model.state_dict(), "recipe_name": recipe.name,
                                "epoch": global_epoch, "metrics": row}, out / "best.pt")
            state["rows"].append(row)
            if main:
                log(" ".join(f"{k}={v}" for k, v in row.items()))
                with open(out / "metrics.csv", "w", newline="") as fh:
                    keys = list(dict.fromkeys(k for r in state["rows"] for k in r))
                    w = csv.DictWriter(fh, fieldnames=keys)
                    w.writeheader()
                    w.writerows(state["rows"])
                _write_curves(state["rows"], out / "curves.png")
                done_stage = epoch + 1 == stage.epochs
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "stage": si + 1 if done_stage else si,
                            "epoch": 0 if done_stage else epoch + 1, "best": state["best"],
                            "best_epoch": state["best_epoch"], "rows": state["rows"]}, ckpt_last)
        state["epoch"] = 0
    if out_of_time and main:
        log(f"time limit of {recipe.train.time_limit_s:.0f} s reached after epoch {global_epoch}")
    if main and not (out / "best.pt").is_file():
        torch.save({"model": model.state_dict(), "recipe_name": recipe.name, "epoch": global_epoch,
                    "metrics": state["rows"][-1] if state["rows"] else {}}, out / "best.pt")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return TrainResult(out, state["best"], state["best_epoch"], state["rows"], epoch_seconds)
