"""End to end through a real ``lungnode run``: DICOMweb STOW-RS to Orthanc, a shadow destination,
the "NOT FOR CLINICAL USE" label and signed webhooks.

DCMTK ``storescu`` sends the real 30-slice chest CT; the node (one local worker, the tiny
random-weights model on CPU) sends SEG + SR over STOW-RS (basic authentication) to Orthanc's
DICOMweb plugin, records what it would have sent to a shadow DIMSE destination without opening an
association to it (a real storage SCP listens there and must receive nothing), and POSTs signed
``done`` and ``delivered`` notifications to a real HTTP listener. ``check-destination`` asks the
STOW-RS destination over QIDO-RS; the web overview lists the shadow delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select

from lungnode.storage.db import Database
from lungnode.storage.models import AuditEvent, Delivery
from tests.node_process import LungnodeProcess, free_port
from tests.ops.test_metrics_e2e import FakePacs
from tests.ops.webhook_listener import webhook_listener
from tests.orthanc import OrthancServer


@pytest.mark.slow
def test_stow_rs_shadow_label_and_webhooks(tmp_path: Path, chest_ct_dir: Path) -> None:
    from tests.node.results.results_factory import make_tiny_bundle

    if not (OrthancServer.available() and Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed")
    files = sorted(chest_ct_dir.glob("*.dcm"))
    bundle = make_tiny_bundle(tmp_path / "tiny.safetensors")
    password, key = tmp_path / "orthanc.pw", tmp_path / "hook.key"
    password.write_text("pa55word\n")
    key.write_text("hook-key\n")
    orthanc = OrthancServer(tmp_path / "orthanc", dicomweb=True, users={"lungnode": "pa55word"})
    orthanc.start()
    shadow_pacs = FakePacs()
    web_port = free_port()
    try:
        with webhook_listener() as hook:
            overrides = {
                "completion": {"quiet_period_s": 20.0, "grace_s": 1.0, "poll_s": 0.1},
                "jobs": {"local_workers": 1, "poll_s": 0.2},
                "inference": {"model": str(bundle), "device": "cpu", "threads": 1},
                "results": {"quality_gate": {"enabled": False}, "label_not_for_clinical_use": True},
                "destinations": [
                    {"name": "cloud", "kind": "stow-rs", "url": orthanc.dicomweb_url, "auth": "basic",
                     "username": "lungnode", "secret_file": str(password), "objects": ["seg", "sr"]},
                    {"name": "preview", "ae_title": "PACS", "host": "127.0.0.1",
                     "port": shadow_pacs.port, "objects": ["seg", "sr"], "mode": "shadow"}],
                "delivery": {"retry_delays_s": [0.5, 1.0], "poll_s": 0.2, "timeout_s": 20.0},
                "metrics": {"enabled": True, "bind": "127.0.0.1", "port": web_port},
                "notifications": [{"name": "hook", "kind": "webhook", "url": hook.url,
                                   "events": ["done", "delivered", "dead_letter"],
                                   "secret_file": str(key), "retry_delays_s": [0.5]}],
            }
            with LungnodeProcess(tmp_path / "node", overrides) as node:
                check = node.cli("check-destination", "cloud", check=False)
                assert check.returncode == 0 and "QIDO-RS answered HTTP 200" in check.stdout, check
                node.wait_running()
                sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "LUNGNODE", "127.0.0.1",
                                       str(node.port), *map(str, files)], capture_output=True,
                                      text=True, timeout=120)
                assert sent.returncode == 0, sent.stderr
                db = Database(node.db_url, create=False)
                try:
                    deadline = time.monotonic() + 300
                    while True:
                        with db.session() as s:
                            rows = {d.destination: (d.state, list(d.acknowledged or []))
                                    for d in s.scalars(select(Delivery))}
                        if rows.get("cloud", ("",))[0] == "sent" and len(hook.requests) >= 2:
                            break
                        if time.monotonic() > deadline:
                            raise AssertionError(f"{rows} {len(hook.requests)}\n{node.log()[-4000:]}")
                        time.sleep(0.5)
                    assert rows["preview"] == ("shadow", [])
                    assert len(rows["cloud"][1]) == 2  # SEG + SR acknowledged over STOW-RS
                    with db.session() as s:
                        shadow = s.scalars(select(AuditEvent).where(
                            AuditEvent.event == "delivery_shadow")).one()
                        assert shadow.details["destination"] == "preview"
                        assert len(shadow.details["objects"]) == 2
                finally:
                    db.dispose()
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/", timeout=30) as resp:
                    overview = resp.read().decode()
                assert f"dimse PACS@127.0.0.1:{shadow_pacs.port}" in overview  # would have gone there
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/jobs/1", timeout=30) as resp:
                    job_page = resp.read().decode()
                assert job_page.count('"ok">acknowledged<') == 2  # SEG + SR at cloud, per object
                assert job_page.count(">recorded (shadow)<") == 2
        assert shadow_pacs.received == [] and shadow_pacs.proposed == set()
        ids = orthanc.wait_for_instances(2)
        descriptions = sorted(orthanc.instance_tags(i)["SeriesDescription"] for i in ids)
        assert all(d.startswith("NOT FOR CLINICAL USE") for d in descriptions), descriptions
        assert sorted(rows["cloud"][1]) == sorted(orthanc.instance_tags(i)["SOPInstanceUID"] for i in ids)
        events = []
        for req in hook.requests:
            expected = "sha256=" + hmac.new(b"hook-key", req.body, hashlib.sha256).hexdigest()
            assert req.headers["X-Lungnode-Signature"] == expected
            events.append(json.loads(req.body))
        kinds = sorted(e["event"] for e in events)
        assert kinds == ["delivered", "done"], kinds  # no "delivered" for the shadow destination
        delivered = next(e for e in events if e["event"] == "delivered")
        assert delivered["delivery"]["destination"] == "cloud"
        assert all("Lung_Dx-A0002" not in json.dumps(e) for e in events)
    finally:
        shadow_pacs.stop()
        orthanc.stop()
