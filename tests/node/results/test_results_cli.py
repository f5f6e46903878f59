"""``lungnode infer``: offline SEG + SR (+ SC, summary page, PDF) from a folder with a model
bundle, valid objects."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.node.results.results_factory import make_tiny_bundle

REPO = Path(__file__).resolve().parents[3]


def test_infer_writes_valid_seg_sr_sc(tmp_path: Path, chest_ct_dir: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "tiny.safetensors")
    config = tmp_path / "c.toml"
    config.write_text('[inference]\ndevice = "cpu"\nthreads = 1\n')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(config), "infer",
                           str(chest_ct_dir), str(out), "--model", str(bundle),
                           "--objects", "seg,sr,sc,summary,pdf"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["written"] == {"seg": 1, "sr": 1, "sc": 30, "summary": 1, "pdf": 1}
    assert report["severity"]["score"].endswith("/30") and report["severity"]["regions"] == "zones"
    assert set(report["severity"]["po_by_region"]) == {
        "right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower"}
    assert "severity score" in report["impression"]
    assert report["lung_ml"]["both"] > 1000  # threshold lung mask of a real chest CT
    seg = pydicom.dcmread(out / "seg-0001.dcm")
    sr = pydicom.dcmread(out / "sr-0001.dcm")
    assert seg.SegmentationType == "BINARY" and seg.Manufacturer == "lungnode"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "tiny-random"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    for name in ("seg-0001.dcm", "sr-0001.dcm", "sc-0001.dcm", "summary-0001.dcm", "pdf-0001.dcm"):
        check = subprocess.run(["dciodvfy", str(out / name)], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], name
