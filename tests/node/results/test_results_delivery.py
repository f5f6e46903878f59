"""Sending stored results to a real Orthanc: exactly once, retries while it is down, no duplicate
after a crash mid-send, dead letter, check-destination, resend and release."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from lungnode.config import Config, parse_config
from lungnode.inference.types import InferenceResult
from lungnode.node.dimse.scu import check_destination
from lungnode.node.dispatch.pipeline import build_and_store
from lungnode.node.results.delivery import DeliverySender, queue_deliveries, release, resend
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import AuditEvent, Delivery, Job, Output
from tests.launch import FAULT_EXIT_STATUS
from tests.orthanc import OrthancServer, free_port

REPO = Path(__file__).resolve().parents[3]


def node_config(tmp_path: Path, port: int, objects: str = '["seg", "sr", "sc"]',
                delays: str = "[0.3, 0.3]") -> Path:
    path = tmp_path / "lungnode.toml"
    path.write_text(f"""
[storage]
root = "{tmp_path / 'store'}"
fsync = false
min_free_disk_mb = 0

[[destinations]]
name = "orthanc"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {port}
objects = {objects}

[delivery]
retry_delays_s = {delays}
timeout_s = 10.0
lease_s = 5.0
poll_s = 0.1
""")
    return path


def setup_job(config: Config, result: InferenceResult,
              state: str = "done") -> tuple[Database, FileStore, int]:
    store = FileStore(Path(config.storage.root), fsync=False)
    db = Database(config.storage.effective_database_url)
    src = result.volume
    import pydicom

    first = pydicom.dcmread(src.source_files[0], stop_before_pixels=True)
    with db.session() as s:
        job = Job(series_uid=str(first.SeriesInstanceUID), study_uid=str(first.StudyInstanceUID),
                  instance_set_hash="x" * 64, instance_count=30, model_id="lungnode-test",
                  model_version="0.0.1", state=state)
        s.add(job)
        s.flush()
        job_pk = job.id
    build_and_store(config, db, store, job_pk, result, None)
    if state == "done":
        with db.session() as s:
            queue_deliveries(s, job_pk, [d.name for d in config.destinations])
    return db, store, job_pk


def delivery(db: Database, job_pk: int) -> Delivery:
    with db.session() as s:
        d = s.scalar(select(Delivery).where(Delivery.job_pk == job_pk))
        assert d is not None
        s.expunge(d)
        return d


def drain(sender: DeliverySender, db: Database, job_pk: int, timeout: float = 30.0) -> Delivery:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sender.run_once()
        d = delivery(db, job_pk)
        if d.state != "pending":
            return d
        time.sleep(0.1)
    return delivery(db, job_pk)


def test_results_arrive_in_source_study_exactly_once(tmp_path: Path, orthanc: OrthancServer,
                                                      chest_result: InferenceResult) -> None:
    config = parse_config(node_config(tmp_path, orthanc.dicom_port).read_text())
    db, store, job_pk = setup_job(config, chest_result)
    sender = DeliverySender(config, db, store)
    d = drain(sender, db, job_pk)
    assert d.state == "sent" and d.delivered_at is not None
    assert len(d.acknowledged) == 32 == len(set(d.acknowledged))  # SEG + SR + 30 SC
    assert sender.run_once() == 0  # nothing left: sent exactly once
    ids = orthanc.wait_for_instances(32)
    tags = [orthanc.instance_tags(i) for i in ids]
    with db.session() as s:
        study_uid = s.get(Job, job_pk).study_uid  # type: ignore[union-attr]
        source_series = s.get(Job, job_pk).series_uid  # type: ignore[union-attr]
    assert {t["StudyInstanceUID"] for t in tags} == {study_uid}
    by_modality: dict[str, list[dict]] = {}
    for t in tags:
        by_modality.setdefault(t["Modality"], []).append(t)
    assert len(by_modality["SEG"]) == 1 and len(by_modality["SR"]) == 1
    assert len(by_modality["OT"]) == 30 or len(by_modality.get("CT", [])) == 0
    seg_id = next(i for i, t in zip(ids, tags, strict=True) if t["Modality"] == "SEG")
    seg_tags = orthanc.get(f"/instances/{seg_id}/tags?simplify")
    assert seg_tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == source_series
    assert orthanc.statistics()["CountStudies"] == 1
    with db.session() as s:
        events = s.scalars(select(AuditEvent.event).where(AuditEvent.job_pk == job_pk)).all()
    assert "delivered" in events


def test_destination_down_then_delivered_once(tmp_path: Path, chest_result: InferenceResult) -> None:
    server = OrthancServer(tmp_path / "orthanc")
    if not server.available():
        pytest.skip("Orthanc is not installed")
    config = parse_config(node_config(tmp_path, server.dicom_port, '["seg", "sr"]').read_text())
    db, store, job_pk = setup_job(config, chest_result)
    sender = DeliverySender(config, db, store)
    assert sender.run_once() == 1
    d = delivery(db, job_pk)
    assert d.state == "pending" and d.attempts == 1 and "association" in d.last_error
    assert sender.run_once() == 0  # backoff: not due yet
    server.start()
    try:
        time.sleep(0.4)
        d = drain(sender, db, job_pk)
        assert d.state == "sent" and d.attempts == 1
        assert len(server.wait_for_instances(2)) == 2
        time.sleep(0.5)
        assert sender.run_once() == 0
        assert len(server.instances()) == 2
    finally:
        server.stop()


def test_crash_mid_send_resends_only_unacknowledged(tmp_path: Path, orthanc: OrthancServer,
                                                    chest_result: InferenceResult) -> None:
    cfg_path = node_config(tmp_path, orthanc.dicom_port)
    config = parse_config(cfg_path.read_text())
    db, store, job_pk = setup_job(config, chest_result)
    # The tests' launcher's sender exits the process right before committing its 6th acknowledgement.
    code = ("import sys; from pathlib import Path; from lungnode.config import load_config; "
            "from tests.launch import FaultySender; "
            "from lungnode.storage.db import Database; from lungnode.storage.filestore import FileStore; "
            f"c = load_config({str(cfg_path)!r}); "
            "s = FaultySender(c, Database(c.storage.effective_database_url), "
            "FileStore(Path(c.storage.root), fsync=False), ('exit', 6)); s.run_once()")
    env = {"PATH": "/usr/bin:/bin", **({"PYTHONPATH": os.environ["PYTHONPATH"]}
                                       if "PYTHONPATH" in os.environ else {})}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          timeout=120)
    assert proc.returncode == FAULT_EXIT_STATUS, proc.stderr.decode()[-2000:]
    d = delivery(db, job_pk)
    assert d.state == "pending" and len(d.acknowledged) == 5  # the 6th was stored, not recorded
    assert len(orthanc.instances()) == 6
    sender = DeliverySender(config, db, store)
    assert sender.run_once() == 0  # the dead process's lease still holds
    time.sleep(5.2)
    d = drain(sender, db, job_pk)
    assert d.state == "sent" and len(d.acknowledged) == 32 == len(set(d.acknowledged))
    assert len(orthanc.instances()) == 32  # the 6th was resent with its UID: stored once
    with db.session() as s:
        uids = set(s.scalars(select(Output.sop_instance_uid).where(Output.job_pk == job_pk)))
    assert set(d.acknowledged) == uids


def test_dead_letter_then_resend(tmp_path: Path, orthanc: OrthancServer,
                                 chest_result: InferenceResult) -> None:
    dead_port = free_port()
    config = parse_config(node_config(tmp_path, dead_port, '["sr"]', "[0.0, 0.0]").read_text())
    db, store, job_pk = setup_job(config, chest_result)
    sender = DeliverySender(config, db, store)
    for _ in range(3):
        assert sender.run_once() == 1
    d = delivery(db, job_pk)
    assert d.state == "dead" and d.attempts == 3
    assert sender.run_once() == 0
    # The destination moves to the running Orthanc; an operator resends the same objects.
    config2 = parse_config(node_config(tmp_path, orthanc.dicom_port, '["sr"]').read_text())
    assert resend(db, config2, job_pk) == ["orthanc"]
    d = drain(DeliverySender(config2, db, store), db, job_pk)
    assert d.state == "sent"
    ids = orthanc.wait_for_instances(1)
    with db.session() as s:
        sr_uid = s.scalar(select(Output.sop_instance_uid).where(Output.job_pk == job_pk,
                                                                 Output.kind == "sr"))
    assert orthanc.instance_tags(ids[0])["SOPInstanceUID"] == sr_uid


def test_held_job_is_not_sent_until_released(tmp_path: Path, orthanc: OrthancServer,
                                             chest_result: InferenceResult) -> None:
    config = parse_config(node_config(tmp_path, orthanc.dicom_port, '["seg", "sr"]').read_text())
    db, store, job_pk = setup_job(config, chest_result, state="held")
    sender = DeliverySender(config, db, store)
    assert sender.run_once() == 0
    with pytest.raises(ValueError):
        resend(db, config, job_pk)
    assert release(db, config, job_pk) == ["orthanc"]
    d = drain(sender, db, job_pk)
    assert d.state == "sent"
    assert len(orthanc.wait_for_instances(2)) == 2
    with db.session() as s:
        assert s.get(Job, job_pk).state == "done"  # type: ignore[union-attr]


def test_check_destination_reports_contexts(orthanc: OrthancServer) -> None:
    from lungnode.config import DestinationConfig

    report = check_destination(DestinationConfig(name="o", ae_title="ORTHANC", host="127.0.0.1",
                                                 port=orthanc.dicom_port), timeout=10)
    assert report.error == "" and report.echo_status == 0
    classes = {a for a, _ in report.accepted}
    assert {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.33",
            "1.2.840.10008.5.1.4.1.1.7"} <= classes
    down = check_destination(DestinationConfig(name="x", ae_title="X", host="127.0.0.1",
                                               port=free_port()), timeout=3)
    assert down.echo_status is None and down.error


def _make_certs(folder: Path) -> dict[str, str]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=lungnode-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
        "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                    "extendedKeyUsage=serverAuth,clientAuth\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"cert": str(folder / "srv.pem"), "key": str(folder / "srv.key"),
            "ca": str(folder / "ca.pem")}


def test_tls_destination(tmp_path: Path, chest_result: InferenceResult) -> None:
    import shutil

    if shutil.which("openssl") is None or not OrthancServer.available():
        pytest.skip("openssl or Orthanc missing")
    certs = _make_certs(tmp_path / "certs")
    server = OrthancServer(tmp_path / "orthanc-tls", tls=certs)
    server.start()
    try:
        text = node_config(tmp_path, server.dicom_port, '["sr"]').read_text()
        text = text.replace("[delivery]", f'[destinations.tls]\nca = "{certs["ca"]}"\n\n[delivery]')
        config = parse_config(text)
        report = check_destination(config.destination("orthanc"), timeout=10)
        assert report.error == "" and report.echo_status == 0
        db, store, job_pk = setup_job(config, chest_result)
        d = drain(DeliverySender(config, db, store), db, job_pk)
        assert d.state == "sent"
        assert len(server.wait_for_instances(1)) == 1
        # Without TLS the same port does not complete an association.
        plain = parse_config(node_config(tmp_path, server.dicom_port, '["sr"]').read_text())
        assert check_destination(plain.destination("orthanc"), timeout=3).echo_status is None
    finally:
        server.stop()
