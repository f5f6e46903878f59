"""``training pretrain``: Med3D-style encoder pretraining on a related phantom task.

With no Kinetics-400 or MedicalNet file on these machines, the encoder is pretrained here the way
Med3D was built: one *shared* encoder and several task-specific decoder heads trained together,
each head segmenting a different structure of the phantoms (lungs, body, bone, airways-and-air
inside the body). Infiltrates are deliberately *not* a pretraining target, so the downstream task
stays a transfer. The encoder's state dict is saved under torchvision's R3D-18 names as a ``.pth``
file, which the node's own loader (:func:`lungnode.inference.model.load_encoder_weights`,
``kind="kinetics"``) reads exactly as it reads the real Kinetics file; use it with
``--set train.pretrained=PATH`` in any recipe with the same encoder depth.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lungnode.inference.model import ModelConfig, UNet3D, build_model
from lungnode.training.augment import sample_patch
from lungnode.training.cases import Case, default_lesion_bank, phantom_cases
from lungnode.training.phantom import PhantomOptions
from lungnode.training.recipe import AugmentSpec
from lungnode.training.trainer import one_cycle

__all__ = ["PRETEXT_TASKS", "pretext_masks", "pretrain_encoder"]

#: Pretext segmentation tasks, one decoder head each.
PRETEXT_TASKS = ("lung", "body", "bone", "air_inside")


def pretext_masks(case: Case) -> np.ndarray:
    """``(4, D, H, W)`` uint8 targets of :data:`PRETEXT_TASKS` derived from a phantom."""
    hu = case.hu
    body = hu > -500
    lung = case.lung if case.lung is not None else np.zeros_like(body)
    from scipy import ndimage

    body_filled = ndimage.binary_fill_holes(body | lung)
    air_inside = (hu < -950) & body_filled & ~lung
    return np.stack([lung, body_filled, hu > 250, air_inside]).astype(np.uint8)


def pretrain_encoder(
    out_dir: Path,
    steps: int = 300,
    depth: int = 3,
    device: str | None = None,
    n_phantoms: int = 32,
    patch: tuple[int, int, int] = (32, 96, 96),
    batch: int = 2,
    phantom_options: PhantomOptions | None = None,
    lesion_bank: str = "",
    log_every: int = 25,
) -> Path:
    """Pretrain a shared R3D-18 encoder with one decoder head per pretext task.

    Parameters
    ----------
    out_dir:
        Folder for ``encoder-pretrained.pth`` and ``pretrain.csv``.
    steps:
        Optimisation steps (each step: one batch, all heads).
    depth:
        Encoder stages kept (must match the recipe that will load it).
    device:
        Default CUDA when available.
    n_phantoms:
        Training phantoms (lesion shapes from the training studies only).
    patch, batch:
        Patch size and batch.
    phantom_options:
        Phantom settings (default 64x176x176 at 2.5x2x2 mm).
    lesion_bank:
        As in recipes (``[data] lesion_bank``).
    log_every:
        Steps between CSV rows.

    Returns
    -------
    Path
        The ``.pth`` encoder state dict.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    train_bank, _ = default_lesion_bank(lesion_bank).split(0.2)
    cases = phantom_cases(n_phantoms, train_bank, phantom_options or PhantomOptions(), 200_000, "pre",
                          "pretrain")
    vols = [(torch.from_numpy(c.hu).to(dev), torch.from_numpy(pretext_masks(c)).to(dev), c.spacing_mm)
            for c in cases]
    cfg = ModelConfig(encoder_depth=depth, num_classes=1, final_channels=8)  # heads: narrow decoders
    heads: list[UNet3D] = [build_model(cfg) for _ in PRETEXT_TASKS]
    shared = heads[0].encoder
    for h in heads[1:]:
        h.encoder = shared  # one encoder, several decoders (Med3D)
    net = nn.ModuleList(heads).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-5)
    sched = one_cycle(opt, 2e-3, steps, pct_start=0.2)
    bce = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(0)
    aug = AugmentSpec()
    rows = ["step,loss," + ",".join(f"loss_{t}" for t in PRETEXT_TASKS) + ",seconds"]
    t0 = time.perf_counter()
    cuda = dev.type == "cuda"
    for step in range(1, steps + 1):
        xs, ys = [], []
        for _ in range(batch):
            hu, m, sp = vols[int(torch.randint(len(vols), (), generator=gen))]
            start = [int(torch.randint(max(1, n - p + 1), (), generator=gen)) for n, p in
                     zip(hu.shape, patch, strict=True)]
            c0, c1, c2 = (s + (p - 1) / 2 for s, p in zip(start, patch, strict=True))
            center = (c0, c1, c2)
            x, y = sample_patch(hu, m, sp, patch, center, gen, aug)
            xs.append(x)
            ys.append(y)
        x, y = torch.stack(xs), torch.stack(ys)
        with torch.autocast(dev.type, torch.bfloat16, enabled=cuda):
            logits = [h(x).float() for h in heads]
        losses = [bce(lg[:, 0], y[:, i]) for i, lg in enumerate(logits)]
        loss = torch.stack(losses).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            rows.append(f"{step},{float(loss):.5f}," + ",".join(f"{float(v):.5f}" for v in losses)
                        + f",{time.perf_counter() - t0:.1f}")
    (out_dir / "pretrain.csv").write_text("\n".join(rows) + "\n")
    path = out_dir / "encoder-pretrained.pth"
    torch.save({k: v.detach().cpu() for k, v in shared.state_dict().items()}, path)
    return path
