"""End to end through ``lungnode run``: DCMTK storescu sends the real chest CT; the node segments
it (random-weights tiny bundle via the checkpoint API; threshold lung mask), builds SEG + SR + SC
and sends them to a real Orthanc, which shows them in the source study referencing the source
series. The node is killed (SIGKILL, children too) while sending, restarted (plain ``lungnode run``
this time), and finishes the
delivery with no duplicate in Orthanc. Then the CLI: ``check-destination`` and ``resend`` (same
UIDs, so Orthanc's count does not change)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lungnode.storage.db import Database
from lungnode.storage.models import Delivery, Job, Output
from tests.node.results.results_factory import make_tiny_bundle
from tests.node_process import LungnodeProcess
from tests.orthanc import OrthancServer


def _delivery(db: Database) -> tuple[str, list[str]]:
    with db.session() as s:
        d = s.scalar(select(Delivery))
        return ("", []) if d is None else (d.state, list(d.acknowledged or []))


@pytest.mark.slow  # ~90-120 s on the shared 2-core machine (tiny model inference on CPU)
def test_storescu_to_node_to_orthanc_with_restart_mid_send(
        tmp_path: Path, orthanc: OrthancServer, chest_ct_dir: Path, dcmtk_env: dict[str, str]) -> None:
    bundle = make_tiny_bundle(tmp_path / "tiny.safetensors")
    overrides: dict[str, Any] = {
        "completion": {"quiet_period_s": 20.0, "grace_s": 1.0, "poll_s": 0.1},
        "jobs": {"local_workers": 1, "poll_s": 0.2},
        "inference": {"model": str(bundle), "device": "cpu", "threads": 1},
        "results": {"quality_gate": {"enabled": False}},
        "destinations": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                          "port": orthanc.dicom_port, "objects": ["seg", "sr", "sc"]}],
        "delivery": {"retry_delays_s": [0.5, 1.0], "poll_s": 0.2, "timeout_s": 20.0,
                     "lease_s": 5.0},
    }
    files = sorted(chest_ct_dir.glob("*.dcm"))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    # First run (through the tests' launcher): the sender blocks right after Orthanc stored its
    # 10th instance, before our acknowledgement is committed; then the node is killed.
    node = LungnodeProcess(tmp_path / "node", overrides, hooks=("--fault-before-ack", "hang:10")).start()
    try:
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "LUNGNODE", "127.0.0.1",
                        str(node.port), *map(str, files)], env=dcmtk_env, check=True,
                       capture_output=True, timeout=120)
        try:
            orthanc.wait_for_instances(10, timeout=240)
        except TimeoutError:
            raise AssertionError(node.log()[-4000:]) from None
        time.sleep(1.0)
        db = Database(node.db_url)
        state, acked = _delivery(db)
        assert state == "pending" and len(acked) == 9, node.log()[-3000:]
        assert len(orthanc.instances()) == 10
    finally:
        node.kill()
    with LungnodeProcess(tmp_path / "node", overrides, port=node.port) as node2:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _delivery(db)[0] != "sent":
            time.sleep(0.3)
        state, acked = _delivery(db)
        assert state == "sent", node2.log()[-3000:]
        assert len(acked) == 32 == len(set(acked))
        ids = orthanc.instances()
        assert len(ids) == 32  # the 10th was sent twice with the same UID: stored once
        tags = [orthanc.instance_tags(i) for i in ids]
        assert {t["StudyInstanceUID"] for t in tags} == {str(source.StudyInstanceUID)}
        modalities = sorted(t["Modality"] for t in tags)
        assert modalities.count("SEG") == 1 and modalities.count("SR") == 1
        seg_id = next(i for i, t in zip(ids, tags, strict=True) if t["Modality"] == "SEG")
        seg = orthanc.get(f"/instances/{seg_id}/tags?simplify")
        assert seg["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == str(source.SeriesInstanceUID)
        assert seg["FrameOfReferenceUID"] == str(source.FrameOfReferenceUID)
        assert seg["Manufacturer"] == "lungnode"
        # One study in Orthanc: the results joined the source study (the CT itself was not sent).
        assert orthanc.statistics()["CountStudies"] == 1
        with db.session() as s:
            job = s.scalar(select(Job))
            assert job is not None and job.state == "done" and job.measurements is not None
            assert len(s.scalars(select(Output)).all()) == 32
            job_pk = job.id
        check = node2.cli("check-destination", "orthanc")
        assert "C-ECHO: OK" in check.stdout and "accepted Segmentation" in check.stdout
        again = node2.cli("resend", str(job_pk), "--now")
        assert "orthanc: sent" in again.stdout and again.returncode == 0, again.stdout + again.stderr
        assert len(orthanc.instances()) == 32  # same SOP Instance UIDs: nothing new
