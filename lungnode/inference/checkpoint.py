"""Checkpoint bundles: one file holding a trained model's weights and everything needed to run it.

Format (``.safetensors``, one file): the tensors are the network's state dict (float32 or float16
storage); the safetensors header's ``__metadata__`` holds one key, ``"lungnode"``, whose value is
the JSON form of :class:`BundleMetadata` (architecture and options, classes, spacing, patch size,
HU window and normalisation, training data, version, metrics) including ``weights_sha256``, the
SHA-256 of the tensors (names, dtypes, shapes and bytes in sorted name order). Loading refuses a
file whose JSON is missing or malformed, whose format version is unknown, whose tensors do not
hash to ``weights_sha256`` (corruption) or do not match the declared architecture (mismatch).
Weights are always loaded into float32 on the CPU.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lungnode.inference.model import ModelConfig, UNet3D, build_model

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "BundleError",
    "BundleMetadata",
    "file_sha256",
    "load_bundle",
    "save_bundle",
]

BUNDLE_FORMAT = "lungnode-bundle"
BUNDLE_FORMAT_VERSION = 1
_META_KEY = "lungnode"


class BundleError(ValueError):
    """A checkpoint bundle that cannot be used (corrupt, mismatched or of an unknown format)."""


@dataclass(frozen=True)
class BundleMetadata:
    """Everything a bundle says about its model besides the weights.

    Attributes
    ----------
    name, version:
        Model identity (goes into the SEG/SR algorithm identification).
    model:
        Architecture options (:class:`ModelConfig`; includes HU window and normalisation).
    classes:
        Name of each output channel. Known names: ``background``, ``lung``, ``lung_right``,
        ``lung_left``, ``infiltrate``.
    activation:
        ``"softmax"`` (mutually exclusive classes) or ``"sigmoid"`` (independent labels).
    spacing_mm:
        ``(slice, row, column)`` spacing the model was trained at.
    patch_size:
        Largest ``(D, H, W)`` sliding-window patch on that grid; the engine balances it to the
        volume (:func:`~lungnode.inference.predict.valid_patch_size`). The default
        (96, 224, 224) at (3.0, 1.6, 1.6) mm covers a typical chest in 1-2 windows and keeps a
        500-slice series at about 4 GB RSS on CPU.
    overlap:
        Default sliding-window overlap (0-1).
    threshold:
        Probability threshold for masks.
    min_component_ml:
        Infiltrate components smaller than this are removed.
    training_data, metrics, notes:
        Free-form provenance (datasets, counts, validation metrics).
    created:
        ISO timestamp written by the trainer.
    weights_dtype:
        Storage dtype of floating tensors, ``"float32"`` or ``"float16"``.
    weights_sha256:
        SHA-256 of the tensors (filled in by :func:`save_bundle`).
    """

    name: str
    version: str
    model: ModelConfig = field(default_factory=ModelConfig)
    classes: tuple[str, ...] = ("background", "infiltrate")
    activation: str = "softmax"
    spacing_mm: tuple[float, float, float] = (3.0, 1.6, 1.6)
    patch_size: tuple[int, int, int] = (96, 224, 224)
    overlap: float = 0.25
    threshold: float = 0.5
    min_component_ml: float = 0.1
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    created: str = ""
    weights_dtype: str = "float32"
    weights_sha256: str = ""
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION

    def class_index(self, name: str) -> int | None:
        """Channel of a class name, ``None`` when the model has no such class."""
        return self.classes.index(name) if name in self.classes else None

    def to_json(self) -> str:
        """JSON text stored in the file header."""
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BundleMetadata:
        """Parse and check the stored JSON."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"bundle metadata is not valid JSON ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT:
            raise BundleError("not a lungnode bundle (format tag missing)")
        if d.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {d.get('format_version')} is not supported "
                f"(this lungnode reads version {BUNDLE_FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BundleError(f"bundle metadata has unknown fields {sorted(unknown)}")
        try:
            d["model"] = ModelConfig.from_dict(d.get("model", {}))
            for key in ("classes", "spacing_mm", "patch_size"):
                if key in d:
                    d[key] = tuple(d[key])
            meta = cls(**d)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bundle metadata is malformed ({exc})") from exc
        meta.validate()
        return meta

    def validate(self) -> None:
        """Check internal consistency; raises :class:`BundleError`."""
        if len(self.classes) != self.model.num_classes:
            raise BundleError(
                f"bundle lists {len(self.classes)} classes but the model has "
                f"{self.model.num_classes} outputs"
            )
        if "infiltrate" not in self.classes:
            raise BundleError("bundle has no 'infiltrate' class")
        if self.activation not in ("softmax", "sigmoid"):
            raise BundleError(f"unknown activation {self.activation!r}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise BundleError("spacing_mm must be three positive numbers")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise BundleError("patch_size must be three positive integers")
        if not 0 <= self.overlap < 1:
            raise BundleError("overlap must be in [0, 1)")
        if self.weights_dtype not in ("float32", "float16"):
            raise BundleError("weights_dtype must be float32 or float16")


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(path: Path | str, model: UNet3D, metadata: BundleMetadata) -> BundleMetadata:
    """Write a bundle file.

    Parameters
    ----------
    path:
        Output file (``.safetensors``); written atomically (temporary file then rename).
    model:
        Trained network; its ``cfg`` must equal ``metadata.model``.
    metadata:
        Description; ``weights_sha256`` is computed here, ``weights_dtype`` selects storage.

    Returns
    -------
    BundleMetadata
        The metadata as written (with ``weights_sha256``).
    """
    if model.cfg != metadata.model:
        raise BundleError("metadata.model does not describe the model being saved")
    metadata.validate()
    store = torch.float16 if metadata.weights_dtype == "float16" else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        t = v.detach().cpu()
        tensors[k] = (t.to(store) if t.is_floating_point() else t).contiguous().clone()
    meta = BundleMetadata(**{**{f.name: getattr(metadata, f.name) for f in fields(metadata)},
                             "weights_sha256": _tensors_sha256(tensors)})
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: meta.to_json()})
    tmp.replace(out)
    return meta


def load_bundle(path: Path | str) -> tuple[UNet3D, BundleMetadata]:
    """Read a bundle into a float32 CPU model in eval mode.

    Parameters
    ----------
    path:
        Bundle file written by :func:`save_bundle`.

    Returns
    -------
    (UNet3D, BundleMetadata)

    Raises
    ------
    BundleError
        Missing, unreadable, corrupt (checksum) or mismatched (names/shapes) files.
    """
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"model bundle {p} does not exist")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises SafetensorError / OSError variants
        raise BundleError(f"{p.name} is not a readable safetensors file ({exc})") from exc
    if _META_KEY not in header:
        raise BundleError(f"{p.name} has no lungnode metadata (not a lungnode bundle)")
    meta = BundleMetadata.from_json(header[_META_KEY])
    digest = _tensors_sha256(tensors)
    if digest != meta.weights_sha256:
        raise BundleError(
            f"{p.name} is corrupt: weights hash {digest[:12]}... does not match the recorded "
            f"{meta.weights_sha256[:12]}..."
        )
    model = build_model(meta.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"{p.name} does not match its declared architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for k, t in expected.items():
        if tensors[k].shape != t.shape:
            raise BundleError(
                f"{p.name}: {k} has shape {list(tensors[k].shape)}, expected {list(t.shape)}"
            )
        tensors[k] = tensors[k].to(t.dtype)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, meta
