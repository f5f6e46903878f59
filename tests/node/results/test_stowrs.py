"""The STOW-RS client against Orthanc's DICOMweb plugin (basic auth, HTTPS with a CA), and the
answer parser on the PS3.18 answer shapes (202 partial, 409 failed)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from lungnode.inference.types import InferenceResult
from lungnode.node.results.stowrs import check_stow, multipart_body, parse_answer, stow_items
from tests.ops.webhook_listener import webhook_listener
from tests.orthanc import OrthancServer


@dataclass
class Target:
    name: str
    url: str
    auth: str = "none"
    username: str = ""
    secret_file: str = ""
    ca: str = ""


@dataclass
class Item:
    sop_instance_uid: str
    path: Path


def _items(chest_ct_dir: Path, n: int) -> list[Item]:
    files = sorted(chest_ct_dir.glob("*.dcm"))[:n]
    return [Item(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), f) for f in files]


@pytest.fixture
def dicomweb(tmp_path: Path) -> OrthancServer:
    if not (OrthancServer.available() and Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed")
    server = OrthancServer(tmp_path / "orthanc", dicomweb=True, users={"lungnode": "pa55word"})
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def test_stow_to_orthanc_with_basic_auth(tmp_path: Path, dicomweb: OrthancServer,
                                         chest_ct_dir: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pa55word\n")
    target = Target("cloud", dicomweb.dicomweb_url, "basic", "lungnode", str(secret))
    assert check_stow(target, timeout=10).ok
    items = _items(chest_ct_dir, 3)
    acked: list[str] = []
    result = stow_items(target, items, timeout=30, on_ack=acked.append)
    assert result.status == 200 and not result.failures and not result.error
    assert acked == result.acknowledged == [i.sop_instance_uid for i in items]
    assert dicomweb.statistics()["CountInstances"] == 3
    stored = {dicomweb.instance_tags(i)["SOPInstanceUID"] for i in dicomweb.instances()}
    assert stored == set(acked)
    # the bytes arrive unchanged
    first = dicomweb.instances()[0]
    uid = dicomweb.instance_tags(first)["SOPInstanceUID"]
    assert any(i.sop_instance_uid == uid for i in items)

    secret.write_text("wrong")
    refused = stow_items(target, items, timeout=30)
    assert refused.status == 401 and "HTTP 401" in refused.error and not refused.acknowledged
    check = check_stow(target, timeout=10)
    assert not check.ok and check.status == 401


def test_https_is_verified_against_the_configured_ca(tmp_path: Path, chest_ct_dir: Path) -> None:
    # Orthanc 1.10.1 (Debian 12) crashes (SIGSEGV) on its first HTTPS connection, so the HTTPS
    # side is a real Python TLS listener with a certificate from a throw-away CA.
    if shutil.which("openssl") is None:
        pytest.skip("openssl missing")
    from tests.node.results.test_results_delivery import _make_certs

    certs = _make_certs(tmp_path / "certs")
    items = _items(chest_ct_dir, 1)
    with webhook_listener(tls=(certs["cert"], certs["key"])) as https:
        untrusted = stow_items(Target("cloud", https.url), items, timeout=10)
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.error and not untrusted.acknowledged
        trusted = Target("cloud", https.url, ca=certs["ca"])
        assert stow_items(trusted, items, timeout=10).acknowledged == [items[0].sop_instance_uid]
    assert len(https.requests) == 1  # the untrusted attempt never sent the data


def test_bearer_token_and_multipart_framing(tmp_path: Path, chest_ct_dir: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    items = _items(chest_ct_dir, 2)
    with webhook_listener(statuses=[200]) as http:  # a plain HTTP listener standing in for a gateway
        result = stow_items(Target("gw", http.url, "bearer", secret_file=str(token)), items, timeout=10)
    req = http.requests[0]
    assert req.path == "/lungnode/studies"
    assert req.headers["Authorization"] == "Bearer tok-123"
    ctype = req.headers["Content-Type"]
    assert ctype.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = ctype.split("boundary=")[1].encode()
    parts = req.body.split(b"--" + boundary)
    assert parts[-1] == b"--\r\n" and len(parts) == 4
    assert parts[1].split(b"\r\n\r\n", 1)[1][:-2] == items[0].path.read_bytes()
    assert result.acknowledged == [i.sop_instance_uid for i in items]  # 200 without a body


@pytest.mark.parametrize("code", [301, 302, 303])
def test_a_redirect_is_a_failed_attempt_not_an_acknowledgement(tmp_path: Path, chest_ct_dir: Path,
                                                              code: int) -> None:
    """urllib would follow a redirected POST as a GET without the files; its 200 must not count
    as "stored"."""
    items = _items(chest_ct_dir, 2)
    with webhook_listener(statuses=[code]) as http:
        result = stow_items(Target("gw", http.url), items, timeout=10)
    assert result.acknowledged == [] and result.status == code
    assert f"HTTP {code}" in result.error and "redirected to" in result.error
    assert [r.method for r in http.requests] == ["POST"]


def _seq(uids: list[str], reason: int | None = None) -> dict[str, object]:
    items = []
    for uid in uids:
        item: dict[str, object] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return {"vr": "SQ", "Value": items}


def test_answer_parser_partial_and_failed() -> None:
    partial = json.dumps({"00081199": _seq(["1.1"]), "00081198": _seq(["1.2"], 0xA700)}).encode()
    result = parse_answer(202, partial, ["1.1", "1.2", "1.3"])
    assert result.acknowledged == ["1.1"]
    assert result.failures == {"1.2": "STOW-RS failure reason 0xA700",
                               "1.3": "not in the STOW-RS answer"}
    failed = parse_answer(409, json.dumps({"00081198": _seq(["1.1"], 0xC000)}).encode(), ["1.1"])
    assert not failed.acknowledged and failed.failures["1.1"].endswith("0xC000")
    assert parse_answer(409, b"", ["1.1"]).error
    body, ctype = multipart_body([b"abc"])
    assert ctype.split("boundary=")[1].encode() in body


@pytest.mark.parametrize(("extra", "key", "expected"), [
    ('kind = "stow-rs"\nurl = "ftp://x"', "destinations[0].url", "http"),
    ('kind = "stow-rs"\nurl = "http://x"\nauth = "digest"', "destinations[0].auth", "'basic'"),
    ('kind = "stow-rs"\nurl = "http://x"\nauth = "basic"\nsecret_file = "/etc/hostname"',
     "destinations[0].username", "user name"),
    ('kind = "stow-rs"\nurl = "http://x"\nauth = "bearer"', "destinations[0].secret_file", "token"),
    ('kind = "stow-rs"\nurl = "http://x"\nca = "/nonexistent.pem"', "destinations[0].ca", "existing"),
    ('kind = "dicomweb"', "destinations[0].kind", "'stow-rs'"),
    ('mode = "dry"\nae_title = "P"\nhost = "h"', "destinations[0].mode", "'shadow'"),
    ('ae_title = "P"', "destinations[0].host", "host"),
])
def test_destination_config_errors(extra: str, key: str, expected: str) -> None:
    from lungnode.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(f'[[destinations]]\nname = "d"\n{extra}\n')
    assert info.value.key == key and expected in info.value.expected


def test_check_destination_command_for_stow_rs(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.node_process import REPO, free_port

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nroot = "{tmp_path}"\n[delivery]\ntimeout_s = 3.0\n[[destinations]]\n'
                   f'name = "cloud"\nkind = "stow-rs"\nurl = "http://127.0.0.1:{free_port()}/dicom-web"\n'
                   'mode = "shadow"\n')
    out = subprocess.run([sys.executable, "-m", "lungnode.cli", "check-destination", "cloud",
                          "--config", str(cfg)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 1
    assert "STOW-RS http://127.0.0.1" in out.stdout and "shadow mode" in out.stdout
    assert "FAILED: cannot reach" in out.stdout


def _stow_config(tmp_path: Path, url: str, secret: Path, delays: str = "[0.3, 0.3]") -> str:
    return f"""
[storage]
root = "{tmp_path / 'store'}"
fsync = false
min_free_disk_mb = 0
[[destinations]]
name = "cloud"
kind = "stow-rs"
url = "{url}"
auth = "basic"
username = "lungnode"
secret_file = "{secret}"
objects = ["seg", "sr"]
[delivery]
retry_delays_s = {delays}
timeout_s = 10.0
lease_s = 5.0
poll_s = 0.1
"""


def test_stow_destination_down_then_sent_once_and_dead_letter(tmp_path: Path,
                                                            chest_result: InferenceResult) -> None:
    """The delivery service with a STOW-RS destination: retry while Orthanc is down, every
    acknowledgement recorded once it is up, nothing sent twice; a refused password ends as a dead
    letter with its audit event."""
    import time

    from sqlalchemy import select

    from lungnode.config import parse_config
    from lungnode.node.results.delivery import DeliverySender
    from lungnode.storage.models import AuditEvent, Output
    from tests.node.results.test_results_delivery import delivery, drain, setup_job

    if not (OrthancServer.available() and Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed")
    secret = tmp_path / "pw"
    secret.write_text("pa55word")
    server = OrthancServer(tmp_path / "orthanc", dicomweb=True, users={"lungnode": "pa55word"})
    config = parse_config(_stow_config(tmp_path, server.dicomweb_url, secret))
    db, store, job_pk = setup_job(config, chest_result)
    sender = DeliverySender(config, db, store)
    assert sender.run_once() == 1
    d = delivery(db, job_pk)
    assert d.state == "pending" and d.attempts == 1 and "STOW-RS to cloud failed" in d.last_error
    server.start()
    try:
        time.sleep(0.4)
        d = drain(sender, db, job_pk)
        assert d.state == "sent" and d.attempts == 1
        with db.session() as s:
            uids = set(s.scalars(select(Output.sop_instance_uid).where(Output.job_pk == job_pk,
                                                                     Output.kind.in_(["seg", "sr"]))))
        assert set(d.acknowledged) == uids and len(d.acknowledged) == 2
        assert {server.instance_tags(i)["SOPInstanceUID"] for i in server.wait_for_instances(2)} == uids
        time.sleep(0.5)
        assert sender.run_once() == 0 and len(server.instances()) == 2  # exactly once

        secret.write_text("wrong")
        (tmp_path / "store2").mkdir()
        config2 = parse_config(_stow_config(tmp_path / "store2", server.dicomweb_url, secret, "[0.0]"))
        db2, store2, job2 = setup_job(config2, chest_result)
        sender2 = DeliverySender(config2, db2, store2)
        assert sender2.run_once() == 1 and sender2.run_once() == 1
        d2 = delivery(db2, job2)
        assert d2.state == "dead" and d2.attempts == 2 and "HTTP 401" in d2.last_error
        with db2.session() as s:
            assert s.scalar(select(AuditEvent.event).where(AuditEvent.event == "delivery_dead")) is not None
    finally:
        server.stop()
