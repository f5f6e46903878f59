"""Patch sampling and augmentation on the training device (CPU or GPU), in one resampling pass.

This module owns turning a resident volume into a training sample. A sample is drawn by building
a sampling grid in millimetres: the output patch's voxel offsets (native spacing for
``mode="patch"``, or spanning the whole volume for the paper's ``mode="resize"``), rotated,
scaled, mirrored and perturbed by a smooth random displacement (perspective-like), then shifted to
a centre. One ``grid_sample`` call gives the crop and every spatial augmentation at once, without
border artefacts, and masks follow the image exactly (bilinear, thresholded at 0.5). Intensity
augmentation (contrast, brightness, noise) acts on HU afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lungnode.training.recipe import AugmentSpec

__all__ = ["intensity_augment", "random_rotation", "sample_patch"]

_PAD_HU = -1024.0


def random_rotation(gen: torch.Generator, max_deg: float) -> torch.Tensor:
    """Rotation matrix (z, y, x order): in-plane angle up to ``max_deg``, tilts up to a third."""
    def ang(scale: float) -> float:
        return math.radians(max_deg * scale * (2 * float(torch.rand((), generator=gen)) - 1))

    a, b, c = ang(1.0), ang(1 / 3), ang(1 / 3)
    rz = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


def sample_patch(
    hu: torch.Tensor,
    masks: torch.Tensor,
    spacing_mm: tuple[float, float, float],
    out_size: tuple[int, int, int],
    center_vox: tuple[float, float, float] | None,
    gen: torch.Generator,
    aug: AugmentSpec | None,
    whole_volume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample one (augmented) patch from a volume.

    Parameters
    ----------
    hu:
        ``(D, H, W)`` HU (any float/int dtype) on the device.
    masks:
        ``(C, D, H, W)`` binary masks (uint8/bool/float) on the same device.
    spacing_mm:
        Volume spacing.
    out_size:
        Patch ``(d, h, w)``.
    center_vox:
        Patch centre in voxel coordinates (``None`` = volume centre).
    gen:
        CPU random generator (augmentation parameters).
    aug:
        Augmentation strengths; ``None`` = no augmentation (plain crop or resize).
    whole_volume:
        ``True``: the patch spans the whole volume (resize mode) instead of native spacing.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        HU ``(1, d, h, w)`` float32 and masks ``(C, d, h, w)`` float32 in {0, 1}.
    """
    dev = hu.device
    shape = hu.shape[-3:]
    extent = [(n - 1) * s for n, s in zip(shape, spacing_mm, strict=False)]
    step = ([e / max(o - 1, 1) for e, o in zip(extent, out_size, strict=False)] if whole_volume
            else list(spacing_mm))
    axes = [(torch.arange(o, dtype=torch.float32, device=dev) - (o - 1) / 2) * st
            for o, st in zip(out_size, step, strict=False)]
    gz, gy, gx = torch.meshgrid(*axes, indexing="ij")
    pts = torch.stack([gz, gy, gx], dim=-1)  # (d, h, w, 3) mm, centred
    apply = aug is not None and float(torch.rand((), generator=gen)) < aug.probability
    if apply and aug is not None:
        rot = random_rotation(gen, aug.rotate_deg)
        s = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * float(torch.rand((), generator=gen))
        mat = rot * s
        if aug.flip_lr and float(torch.rand((), generator=gen)) < 0.5:
            mat = mat @ torch.diag(torch.tensor([1.0, 1.0, -1.0]))
        pts = pts @ mat.T.to(dev)
        if aug.perspective > 0:
            disp = (torch.randn((1, 3, 3, 3, 3), generator=gen) * aug.perspective).to(dev)
            disp = F.interpolate(disp, size=out_size, mode="trilinear", align_corners=True)[0]
            half = torch.tensor([e / 2 for e in extent], device=dev).clamp(min=1.0)
            pts = pts + disp.permute(1, 2, 3, 0) * half
    if center_vox is None:
        center_mm = torch.tensor([e / 2 for e in extent])
    else:
        center_mm = torch.tensor([c * s for c, s in zip(center_vox, spacing_mm, strict=False)])
    pts = pts + center_mm.to(dev)
    denom = torch.tensor([max(e, 1e-6) for e in extent], device=dev)
    norm = pts / denom * 2 - 1  # align_corners=True convention
    grid = norm[..., [2, 1, 0]][None]  # grid_sample wants (x, y, z)
    src = torch.cat([hu[None].float() - _PAD_HU, masks.float()], dim=0)[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    img = out[:1] + _PAD_HU
    msk = (out[1:] > 0.5).float()
    if apply and aug is not None:
        img = intensity_augment(img, gen, aug)
    return img, msk


def intensity_augment(img: torch.Tensor, gen: torch.Generator, aug: AugmentSpec) -> torch.Tensor:
    """Contrast (about -500 HU), brightness and Gaussian noise in HU."""
    c = aug.contrast[0] + (aug.contrast[1] - aug.contrast[0]) * float(torch.rand((), generator=gen))
    b = aug.brightness_hu * (2 * float(torch.rand((), generator=gen)) - 1)
    out = (img + 500.0) * c - 500.0 + b
    sigma = aug.noise_hu[0] + (aug.noise_hu[1] - aug.noise_hu[0]) * float(torch.rand((), generator=gen))
    if sigma > 0:
        # drawn on the device (global RNG, seeded by the trainer): no host work or copy per voxel
        out = out + torch.randn(out.shape, device=out.device) * sigma
    return out
