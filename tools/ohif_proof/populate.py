"""Putting a chest CT and its results into Orthanc: through ``lungnode run`` (the real flow),
lungnode's builders, or the harness SEG; and the threshold stand-in engine."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tools.ohif_proof.common import REPO, Mask, log, wait_until
from tools.ohif_proof.harness_seg import make_harness_seg, threshold_lung_mask
from tools.ohif_proof.orthanc import Orthanc

SOURCES = ("node", "builders", "harness")


def threshold_result(files: Sequence[Path]) -> Any:
    """A real :class:`lungnode.inference.types.InferenceResult` of a CT series without the model.

    Lungs: :func:`threshold_lung_mask` per slice (right lung = image left half); infiltrate: a disc
    of 25 pixels radius around the deepest point of the right lung on the middle five lung slices.
    """
    from scipy import ndimage

    from lungnode.inference.dicom_io import read_series
    from lungnode.inference.types import (
        LUNG_LEFT,
        LUNG_RIGHT,
        InferenceResult,
        Measurements,
        ModelInfo,
        RegionMeasurement,
    )

    volume = read_series(list(files))
    lung = np.stack([threshold_lung_mask(s) for s in volume.hu])
    labels = np.zeros(lung.shape, dtype=np.uint8)
    mid = lung.shape[2] // 2
    labels[:, :, :mid][lung[:, :, :mid]] = LUNG_RIGHT
    labels[:, :, mid:][lung[:, :, mid:]] = LUNG_LEFT
    infiltrate = np.zeros(lung.shape, dtype=bool)
    with_lung = np.flatnonzero((labels == LUNG_RIGHT).any(axis=(1, 2)))
    centre = int(with_lung[len(with_lung) // 2]) if with_lung.size else 0
    yy, xx = np.mgrid[: lung.shape[1], : lung.shape[2]]
    for k in range(max(centre - 2, 0), min(centre + 3, lung.shape[0])):
        right = labels[k] == LUNG_RIGHT
        if right.any():
            dist = ndimage.distance_transform_edt(right)
            cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
            infiltrate[k] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 25 ** 2) & right
    v = volume.voxel_volume_ml

    def region(mask: Mask) -> Any:
        return RegionMeasurement(lung_ml=float(mask.sum() * v),
                                 infiltrate_ml=float((infiltrate & mask).sum() * v),
                                 ground_glass_ml=0.0, consolidation_ml=0.0)

    measurements = Measurements(left=region(labels == LUNG_LEFT), right=region(labels == LUNG_RIGHT),
                                both=region(labels > 0))
    return InferenceResult(volume=volume, lung_labels=labels, infiltrate=infiltrate,
                           measurements=measurements,
                           model=ModelInfo(name="viewer-proof-threshold", version="0",
                                           sha256="0" * 64))


class ThresholdEngine:
    """Stand-in inference engine for ``lungnode run`` (given by ``tests/launch.py --engine``) while no model
    bundle is available: :func:`threshold_result` on the job's files."""

    def run(self, files: Sequence[Path]) -> Any:
        """Segment the series in ``files``."""
        return threshold_result([Path(f) for f in files])


def threshold_engine(config: Any) -> ThresholdEngine:
    """``python -m tests.launch --engine tools.ohif_proof.populate:threshold_engine``."""
    return ThresholdEngine()


#: The model bundle ``lungnode run`` uses by default.
BUNDLED_MODEL = REPO / "lungnode" / "models" / "lungnode-ct.safetensors"


def populate_harness(orthanc: Orthanc, ct_dir: Path, workdir: Path, shift: int = 0) -> None:
    """CT by REST plus the harness SEG (:func:`make_harness_seg`, ``shift`` columns misplaced)."""
    for path in sorted(ct_dir.glob("*.dcm")):
        orthanc.post_instance(path.read_bytes())
    seg = make_harness_seg(ct_dir, workdir / "harness-seg.dcm", shift=shift)
    orthanc.post_instance(seg.path.read_bytes())


def populate_builders(orthanc: Orthanc, ct_dir: Path) -> None:
    """CT by REST plus SEG, SR, SC and the summary page from lungnode's own builders on a
    threshold result."""
    from lungnode.node.results.build import Profile, build_outputs
    from lungnode.node.results.common import OutputContext

    result = threshold_result(sorted(ct_dir.glob("*.dcm")))
    for path in sorted(ct_dir.glob("*.dcm")):
        orthanc.post_instance(path.read_bytes())
    outputs = build_outputs(result, OutputContext(job_id=1, model=result.model),
                            Profile(objects=("seg", "sr", "sc", "summary")))
    for out in outputs:
        orthanc.post_instance(out.data)


def populate_node(orthanc: Orthanc, ct_dir: Path, workdir: Path, engine: str = "auto",
                  destination: dict[str, Any] | None = None,
                  timeout: float = 900.0) -> tuple[str, str]:
    """The real flow: storescu → ``lungnode run`` → C-STORE of SEG, SR, SC and the summary page
    into Orthanc.

    ``engine``: ``model`` (the node's configured model), ``threshold`` (:class:`ThresholdEngine`
    through ``tests/launch.py --engine``: everything real except the segmentation), or ``auto`` (the model
    when :data:`BUNDLED_MODEL` exists). ``destination``: extra keys of the ``[[destinations]]`` entry
    (e.g. ``{"omit_empty_frames": True}``). Returns (engine used, the node's log). Raises TimeoutError when
    the results do not arrive.
    """
    from tests.node_process import LungnodeProcess

    n_ct = len(list(ct_dir.glob("*.dcm")))
    if engine == "auto":
        engine = "model" if BUNDLED_MODEL.is_file() else "threshold"
    jobs: dict[str, Any] = {"local_workers": 1, "poll_s": 0.5}
    if engine == "threshold":
        log.warning("lungnode run with the threshold stand-in engine (model bundle %s %s)",
                    BUNDLED_MODEL, "exists" if BUNDLED_MODEL.is_file() else "is missing")
    overrides = {
        "completion": {"quiet_period_s": 5.0, "grace_s": 1.0},
        "jobs": jobs,
        "delivery": {"retry_delays_s": [2.0, 5.0, 10.0], "timeout_s": 30.0, "poll_s": 0.5},
        "destinations": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                          "port": orthanc.dicom_port, "objects": ["seg", "sr", "sc", "summary"],
                          **(destination or {})}],
    }
    if engine == "threshold":  # the stand-in's masks are not meant to pass the gate's plausibility
        overrides["results"] = {"quality_gate": {"enabled": False}}
    # the bundled model runs under the default quality gate (it passes on this real CT)
    hooks = ("--engine", "tools.ohif_proof.populate:threshold_engine") if engine == "threshold" else ()
    node = LungnodeProcess(workdir / "node", overrides, hooks=hooks)
    node.start()
    try:
        env = dict(os.environ, TCP_NODELAY="1")
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "LUNGNODE", "127.0.0.1",
                        str(node.port), *[str(p) for p in sorted(ct_dir.glob("*.dcm"))]],
                       check=True, capture_output=True, env=env, timeout=120)

        def arrived() -> bool:
            series = orthanc.find("Series", {})
            mods = {str(x["MainDicomTags"].get("Modality")) for x in series}
            others = [x for x in series
                      if str(x["MainDicomTags"].get("Modality")) not in ("CT", "SEG", "SR")]
            pages = [x for x in others if "AI lung report page" in str(x["MainDicomTags"].get(
                "SeriesDescription", ""))]
            overlay = [len(x["Instances"]) for x in others if x not in pages]
            return ("SEG" in mods and "SR" in mods and bool(overlay) and max(overlay) >= n_ct
                    and bool(pages))

        try:
            wait_until(arrived, timeout, "SEG, SR, SC and the summary page from lungnode in Orthanc",
                       interval=2.0)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- lungnode log (tail) ---\n{node.log()[-4000:]}") from exc
        # the CT itself is what the radiologist has in the PACS already: add it by REST
        for path in sorted(ct_dir.glob("*.dcm")):
            orthanc.post_instance(path.read_bytes())
        return engine, node.log()
    finally:
        node.stop()
