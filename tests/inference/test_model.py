"""Model architecture and pretrained-weight loading (torchvision r3d_18 and Med3D layouts)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lungnode.inference.model import EncoderWeightsError, ModelConfig, build_model, load_encoder_weights

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, ch: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (ch,)) for k in BN}


def expected_r3d18(depth: int = 4, in_ch: int = 3) -> dict[str, tuple[int, ...]]:
    """torchvision r3d_18 encoder layout, written from the architecture (no torchvision)."""
    out: dict[str, tuple[int, ...]] = {"stem.0.weight": (64, in_ch, 3, 7, 7), **_bn("stem.1", 64)}
    cin = 64
    for i, w in enumerate((64, 128, 256, 512)[:depth], start=1):
        for b in (0, 1):
            p = f"layer{i}.{b}"
            c = cin if b == 0 else w
            out[f"{p}.conv1.0.weight"] = (w, c, 3, 3, 3)
            out.update(_bn(f"{p}.conv1.1", w))
            out[f"{p}.conv2.0.weight"] = (w, w, 3, 3, 3)
            out.update(_bn(f"{p}.conv2.1", w))
            if b == 0 and i > 1:
                out[f"{p}.downsample.0.weight"] = (w, cin, 1, 1, 1)
                out.update(_bn(f"{p}.downsample.1", w))
        cin = w
    return out


def expected_med3d10(depth: int = 4) -> dict[str, tuple[int, ...]]:
    """MedicalNet ResNet-10, shortcut A (no downsample parameters)."""
    out: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 1, 7, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for i, w in enumerate((64, 128, 256, 512)[:depth], start=1):
        p = f"layer{i}.0"
        out[f"{p}.conv1.weight"] = (w, cin, 3, 3, 3)
        out.update(_bn(f"{p}.bn1", w))
        out[f"{p}.conv2.weight"] = (w, w, 3, 3, 3)
        out.update(_bn(f"{p}.bn2", w))
        cin = w
    return out


def _random_sd(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: (torch.tensor(3) if not s else torch.randn(s, generator=g)) for k, s in layout.items()}


def _save_named(sd: dict[str, torch.Tensor], folder: Path, stem: str) -> Path:
    tmp = folder / "tmp.pth"
    torch.save(sd, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"{stem}-{digest[:8]}.pth"
    tmp.rename(path)
    return path


def test_r3d18_names_and_shapes_match_torchvision_layout() -> None:
    model = build_model(ModelConfig())
    got = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    assert got == expected_r3d18()
    n = sum(p.numel() for p in model.encoder.parameters()) + 400 * 512 + 400  # plus torchvision's fc
    assert round(n / 1e6, 1) == 33.4


def test_kinetics_state_dict_loads(tmp_path: Path) -> None:
    sd = _random_sd(expected_r3d18())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(400, 512), torch.randn(400)
    path = _save_named(sd, tmp_path, "r3d_18")
    model = build_model(ModelConfig())
    unused = load_encoder_weights(model, path, kind="kinetics")
    assert unused == ["fc.bias", "fc.weight"]
    assert torch.equal(model.encoder.state_dict()["layer3.0.downsample.0.weight"],
                       sd["layer3.0.downsample.0.weight"])


def test_kinetics_hash_prefix_is_checked(tmp_path: Path) -> None:
    sd = _random_sd(expected_r3d18())
    path = tmp_path / "r3d_18-b3b3357e.pth"  # the official name, but not the official bytes
    torch.save(sd, path)
    with pytest.raises(EncoderWeightsError, match="SHA-256"):
        load_encoder_weights(build_model(ModelConfig()), path)


def test_missing_and_misshaped_keys_are_refused(tmp_path: Path) -> None:
    sd = _random_sd(expected_r3d18())
    del sd["layer2.1.conv2.0.weight"]
    torch.save(sd, tmp_path / "a.pth")
    with pytest.raises(EncoderWeightsError, match="missing"):
        load_encoder_weights(build_model(ModelConfig()), tmp_path / "a.pth")
    sd = _random_sd(expected_r3d18())
    sd["layer1.0.conv1.0.weight"] = torch.randn(64, 64, 1, 3, 3)
    torch.save(sd, tmp_path / "b.pth")
    with pytest.raises(EncoderWeightsError, match="shape"):
        load_encoder_weights(build_model(ModelConfig()), tmp_path / "b.pth")
    with pytest.raises(EncoderWeightsError):
        load_encoder_weights(build_model(ModelConfig()), tmp_path / "b.pth", kind="med3d")


@pytest.mark.parametrize("depth", [3, 2])
def test_truncated_encoders_load_and_run(tmp_path: Path, depth: int) -> None:
    sd = _random_sd(expected_r3d18())
    torch.save(sd, tmp_path / "full.pth")
    model = build_model(ModelConfig(encoder_depth=depth, final_channels=8))
    assert {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()} == expected_r3d18(depth)
    unused = load_encoder_weights(model, tmp_path / "full.pth")
    assert all(k.startswith(tuple(f"layer{i}." for i in range(depth + 1, 5))) for k in unused)
    with torch.inference_mode():
        y = model.eval()(torch.full((1, 1, 5, 21, 19), -500.0))
    assert y.shape == (1, 2, 5, 21, 19)


def test_one_channel_stem_sums_rgb(tmp_path: Path) -> None:
    sd = _random_sd(expected_r3d18())
    torch.save(sd, tmp_path / "k.pth")
    model = build_model(ModelConfig(in_channels=1))
    load_encoder_weights(model, tmp_path / "k.pth")
    stem = model.encoder.state_dict()["stem.0.weight"]
    assert stem.shape == (64, 1, 3, 7, 7)
    assert torch.allclose(stem, sd["stem.0.weight"].sum(dim=1, keepdim=True))
    # a grey image tripled through the RGB stem equals the 1-channel stem on the image
    rgb = build_model(ModelConfig(in_channels=3))
    load_encoder_weights(rgb, tmp_path / "k.pth")
    x = torch.randn(1, 1, 4, 16, 16)
    a = torch.nn.functional.conv3d(x.expand(-1, 3, -1, -1, -1), sd["stem.0.weight"], padding=(1, 3, 3))
    b = torch.nn.functional.conv3d(x, stem, padding=(1, 3, 3))
    assert torch.allclose(a, b, atol=1e-4)


def test_med3d_state_dict_loads(tmp_path: Path) -> None:
    sd = {f"module.{k}": v for k, v in _random_sd(expected_med3d10()).items()}
    sd["module.conv_seg.0.weight"] = torch.randn(32, 512, 3, 3, 3)
    torch.save({"state_dict": sd}, tmp_path / "resnet_10.pth")
    model = build_model(ModelConfig(encoder="med3d_resnet10", in_channels=1, final_channels=8))
    assert {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()} == expected_med3d10()
    unused = load_encoder_weights(model, tmp_path / "resnet_10.pth", kind="med3d")
    assert unused == ["conv_seg.0.weight"]
    got = model.encoder.state_dict()["layer4.0.conv2.weight"]
    assert torch.equal(got, sd["module.layer4.0.conv2.weight"])
    with torch.inference_mode():
        y = model.eval()(torch.zeros(1, 1, 9, 17, 23))
    assert y.shape == (1, 2, 9, 17, 23)
    with pytest.raises(EncoderWeightsError):
        load_encoder_weights(model, tmp_path / "resnet_10.pth", kind="kinetics")


def test_model_output_is_logits_per_class_at_any_size() -> None:
    model = build_model(ModelConfig(encoder_depth=3, num_classes=3, final_channels=8)).eval()
    assert model.divisor == (4, 8, 8)
    with torch.inference_mode():
        y = model(torch.randn(2, 1, 7, 30, 33) * 400)
    assert y.shape == (2, 3, 7, 30, 33)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 8, 16, 16))
